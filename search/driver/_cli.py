"""The command line of `python -m search.pareto`: its flags, and `Flags`, their typed, frozen form."""
from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass

from search.optimizer import DEFAULT_SAMPLER, DEFAULT_TIE_BREAK, GP_TRIALS, SAMPLERS
from trainables.cliutil import OneLineParser
from trainables.contract import DIRECTIONS, OBJECTIVES

DESCRIPTION = """The distributed Pareto sweep.

Ray Tune runs one adversarial Binary-Relax training per trial, Optuna proposes configurations
(three objectives, all maximised: clean accuracy, robust accuracy, channel sparsity), and the
driver logs everything to MLflow. With no arguments it runs a small local sweep on the embedded
digits data. Every input is checked before Ray starts or anything is written.
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m search.pareto", description=DESCRIPTION)
    p.add_argument("--name", help="sweep name (default: sweep-<date>-<time>); resume by name")
    p.add_argument("--space", help="built-in space name, or a .py/.yaml file (default: digits, the paper "
                                   "space with ranges for the quick start's budget, on --dataset digits; "
                                   "else paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a parameter for every trial (repeatable)")
    p.add_argument("--dataset", default="digits", help="digits, cifar10, mnist, fashion-mnist, svhn or folder:PATH")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--subset-train", type=int)
    p.add_argument("--subset-test", type=int)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: {DEFAULT_SAMPLER}: with --scheduler fifo "
                                     f"GP below {GP_TRIALS} trials and TPE from {GP_TRIALS}; TPE with --scheduler moasha)")
    p.add_argument("--scheduler", default="fifo", help="fifo (every trial runs all epochs) or moasha")
    p.add_argument("--grace-period", type=int, default=1, help="moasha: first rung, in epochs")
    p.add_argument("--reduction-factor", type=float, default=3.0, help="moasha: keep the top 1/eta at each rung")
    p.add_argument("--tie-break", default=DEFAULT_TIE_BREAK, help="moasha: order inside a non-dominated front, "
                                                                  "crowding (NSGA-II's; default, measured better in "
                                                                  "docs/benchmarks.md) or epsnet (Syne Tune's)")
    p.add_argument("--min-clean-acc", type=float,
                   help="floor: trials at or below it are infeasible (default: chance, 1/number of classes)")
    p.add_argument("--min-robust-acc", type=float, help="floor: trials below it are infeasible (default 0)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help=f"2 to 4 of {', '.join(f'{m} ({d})' for m, d in DIRECTIONS.items())}, comma-separated, "
                        "each optionally NAME:DIRECTION (default: %(default)s)")
    p.add_argument("--max-size-kib", type=float, help="cap: trials whose packed file is larger are infeasible")
    p.add_argument("--max-latency-ms", type=float,
                   help="cap: trials whose ONNX model is slower in onnxruntime are infeasible (needs onnxruntime)")
    p.add_argument("--warm-start", action="append", default=[], metavar="NAME",
                   help="seed the study with the finished trials of an earlier sweep NAME under the same "
                        "--storage-path (repeatable; not re-run, labelled imported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: what the cluster can grow to, so pending trials make the autoscaler add nodes)")
    p.add_argument("--cpus-per-trial", type=float,
                   help="default: 1, or with a GPU per trial the CPUs that come with one GPU on the GPU node type")
    p.add_argument("--gpus-per-trial", type=float,
                   help="default: 1 if the cluster has or can launch GPU nodes, else 0; fractions allowed")
    p.add_argument("--cluster-config", help="the autoscaler's cluster YAML, for the node types the cluster can launch "
                   "(default: the one the running autoscaler uses, or ~/ray_bootstrap_config.yaml on the head)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a trial from its last checkpoint")
    p.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=True,
                   help="run the next trial in a finished trial's worker process: saves the process start "
                        "and imports per trial (seconds, docs/benchmarks.md \"Sweep overhead\"), with the same "
                        "results; --no-reuse-actors starts a fresh process per trial (Ray Tune's default)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start Ray locally)")
    p.add_argument("--num-cpus", type=int, help="local Ray only: CPUs to use")
    p.add_argument("--storage-path", default="./brsearch_results",
                   help="results, checkpoints and the sweep's state (shared by all nodes: NFS, s3://, gs://)")
    p.add_argument("--study-storage", help="keep the Optuna study here instead: an Optuna RDB URL "
                   "(postgresql://..., mysql://..., sqlite:///PATH) or a journal file path")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="brsearch", help="MLflow experiment holding the sweep's runs")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name")
    p.add_argument("--resume-logging", action="store_true",
                   help="send to MLflow what the sweep --name stored but could not log (tracking server down); trains nothing")
    p.add_argument("--mlflow-wait", type=float, default=60.0, metavar="SECONDS",
                   help="at the end, how long to wait for an unreachable tracking server while nothing gets through "
                        "before leaving the rest to --resume-logging")
    p.add_argument("--register", metavar="NAME",
                   help="register the front's models in the MLflow Model Registry under NAME, with aliases")
    p.add_argument("--quiet", action="store_true", help="less Ray output")
    return p


@dataclass(frozen=True)
class Flags:
    """The command line after its checks (and, on `--resume`, with the stored sweep's values
    adopted): what every later step reads. Field names are the flags' (`--max-concurrent` is
    `max_concurrent`); None means "not given, decided later" (resources: from the cluster). The
    defaults are the parser's: `Flags.parse([])`."""

    name: str | None
    space: str | None
    set: tuple[str, ...]
    dataset: str
    data_root: str
    download: bool
    subset_train: int | None
    subset_test: int | None
    trials: int
    epochs: int
    sampler: str
    scheduler: str
    grace_period: int
    reduction_factor: float
    tie_break: str
    min_clean_acc: float | None
    min_robust_acc: float | None
    objectives: str
    max_size_kib: float | None
    max_latency_ms: float | None
    warm_start: tuple[str, ...]
    seed: int
    max_concurrent: int | None
    cpus_per_trial: float | None
    gpus_per_trial: float | None
    cluster_config: str | None
    max_failures: int
    reuse_actors: bool
    address: str | None
    num_cpus: int | None
    storage_path: str
    study_storage: str | None
    tracking_uri: str
    experiment: str
    resume: bool
    resume_logging: bool
    mlflow_wait: float
    register: str | None
    quiet: bool

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> Flags:
        return cls.from_namespace(build_parser().parse_args(argv))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> Flags:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        values["set"] = tuple(values.get("set") or ())
        values["warm_start"] = tuple(values.get("warm_start") or ())
        if values.get("sampler") is None:
            values["sampler"] = DEFAULT_SAMPLER
        return cls(**values)

    def given(self, name: str) -> bool:
        """The flag differs from its default (so the user gave it)."""
        return getattr(self, name) != getattr(_defaults(), name)


@functools.cache
def _defaults() -> Flags:
    return Flags.parse([])
