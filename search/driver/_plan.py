"""What a sweep will run: the command line, its checks, and the stored sweep a `--resume` adopts.

`prepare` turns the flags into a validated `Plan` and writes nothing, so every bad input fails
with one line before Ray, MLflow or the storage are touched; `search.pareto` then runs the plan.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.cliutil import OneLineParser
from trainables.config import ConfigError, TrainConfig
from trainables.fileio import unwritable

# not .searcher: it imports Ray and Optuna
from .objectives import (
    DEFAULT_SAMPLER,
    DEFAULT_TIE_BREAK,
    GP_TRIALS,
    SAMPLERS,
    TIE_BREAKS,
    Floors,
    resolve_sampler,
    scheduler_gap,
)
from .space import Space, joint_modelling_gap, load_space, parse_sets
from .state import SweepState, is_remote, study_spec_from_flag

SCHEDULERS = ("fifo", "moasha")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m search.pareto", description=__doc__)
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
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: {DEFAULT_SAMPLER}, also with "
                                     f"--scheduler moasha: GP below {GP_TRIALS} trials, TPE from {GP_TRIALS})")
    p.add_argument("--scheduler", default="fifo", help="fifo (every trial runs all epochs) or moasha")
    p.add_argument("--grace-period", type=int, default=1, help="moasha: first rung, in epochs")
    p.add_argument("--reduction-factor", type=float, default=3.0, help="moasha: keep the top 1/eta at each rung")
    p.add_argument("--tie-break", default=DEFAULT_TIE_BREAK, help="moasha: order inside a non-dominated front, "
                                                                  "crowding (NSGA-II's; default, measured better in "
                                                                  "docs/benchmarks.md) or epsnet (Syne Tune's)")
    p.add_argument("--min-clean-acc", type=float,
                   help="floor: trials at or below it are infeasible (default: chance, 1/number of classes)")
    p.add_argument("--min-robust-acc", type=float, help="floor: trials below it are infeasible (default 0)")
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
    p.add_argument("--reuse-actors", action="store_true",
                   help="run the next trial in the finished trial's worker process instead of a new one: "
                        "saves the process start and imports per trial (seconds; worth it for short "
                        "trials, docs/benchmarks.md); off by default, as in Ray Tune")
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


@dataclass
class Plan:
    """Everything validated, nothing written yet."""

    args: argparse.Namespace
    name: str
    space: Space
    storage_path: str
    exp_dir: str
    local: bool
    tracking_uri: str
    address: str | None
    resume: bool
    stored: dict[str, Any] = field(default_factory=dict)
    floors: Floors = field(default_factory=lambda: Floors(0.0))

    @property
    def state(self) -> SweepState:
        return SweepState(self.storage_path, self.name, self.args.study_storage)

    @property
    def state_dir(self) -> Path:
        """Where the driver keeps sweep.json and the Optuna study (a local mirror for s3://)."""
        return self.state.dir

    def record(self) -> dict[str, Any]:
        a = self.args
        return {
            "name": self.name, "space": self.space.describe(), "fingerprint": self.space.fingerprint(),
            "sampler": a.sampler, "scheduler": a.scheduler, "seed": a.seed, "trials": a.trials,
            "epochs": a.epochs, "dataset": a.dataset, "storage_path": self.storage_path,
            "tracking_uri": self.tracking_uri, "experiment": a.experiment,
            "grace_period": a.grace_period, "reduction_factor": a.reduction_factor,
            "tie_break": a.tie_break, "min_clean_acc": a.min_clean_acc, "min_robust_acc": a.min_robust_acc,
            "reuse_actors": bool(getattr(a, "reuse_actors", False)),
            "register": getattr(a, "register", None),
            "study_storage": a.study_storage, "study_spec": self.state.study_spec(),
        }


def _host_port(address: str, default_port: int | None = None) -> tuple[str, int] | None:
    """host, port of HOST:PORT, ray://HOST:PORT or http(s)://[user@]HOST[:PORT]/...; None if none."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if sep and port.isdigit() and host:
        return host.strip("[]"), int(port)
    if default_port and rest and ":" not in rest.strip("[]"):
        return rest.strip("[]"), default_port
    return None


def _unreachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def prepare(args: argparse.Namespace) -> Plan:
    """All the checks, none of the writes; raises ConfigError with a one-line message. The cheap
    checks come first, before torch, Ray and MLflow are imported (seconds), so a typo fails fast."""
    if args.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {args.scheduler!r} is unknown; accepted: {', '.join(SCHEDULERS)}")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {args.sampler!r} is unknown; accepted: {', '.join(SAMPLERS)}")
    for flag in ("trials", "epochs", "max_concurrent", "grace_period"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {v}; accepted: an integer >= 1")
    if args.tie_break not in TIE_BREAKS:
        raise ConfigError(f"--tie-break {args.tie_break!r} is unknown; accepted: {', '.join(TIE_BREAKS)}")
    for flag in ("min_clean_acc", "min_robust_acc"):
        v = getattr(args, flag)
        if v is not None and not 0.0 <= v < 1.0:
            raise ConfigError(f"--{flag.replace('_', '-')} {v}; accepted: a number in [0, 1)")
    if args.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor {args.reduction_factor}; accepted: a number > 1")
    if (args.cpus_per_trial is not None and args.cpus_per_trial <= 0) or (args.gpus_per_trial is not None and args.gpus_per_trial < 0):
        raise ConfigError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures {args.max_failures}; accepted: an integer >= 0")
    if args.resume_logging:
        if not args.name:
            raise ConfigError("--resume-logging needs --name NAME of the sweep to log")
        args.resume = True  # the stored sweep, checked as for --resume
    if args.mlflow_wait < 0:
        raise ConfigError(f"--mlflow-wait {args.mlflow_wait}; accepted: seconds >= 0")
    if args.register is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$", args.register):
        raise ConfigError(f"--register {args.register!r}; accepted: letters, digits, '_', '-', '.'")
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name NAME of the sweep to continue")
    name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    if not NAME_RE.match(name):
        raise ConfigError(f"--name {name!r}; accepted: letters, digits, '_', '-', '.' (up to 100)")

    if args.study_storage:
        try:
            study_spec_from_flag(args.study_storage)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    stored_space = _adopt_stored(args, name) if args.resume else None

    base: dict[str, Any] = {"dataset": args.dataset, "epochs": args.epochs, "download": args.download,
                            "data_root": str(Path(os.path.expanduser(args.data_root)).resolve())}
    if args.dataset.startswith("folder:"):
        base["dataset"] = "folder:" + str(Path(os.path.expanduser(args.dataset[7:])).resolve())
    for k in ("subset_train", "subset_test"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    if stored_space is not None:  # --resume without --space/--set/...: the sweep's own space
        space = stored_space
    else:
        space = load_space(args.space or ("digits" if args.dataset == "digits" else "paper"))
        space = space.pin({**base, **parse_sets(args.set)})
    space.validate()
    if args.gpus_per_trial is not None:  # else checked in run(), once the cluster's GPUs are known
        why = device_refusal(space.fixed.get("device"), args.gpus_per_trial)
        if why:
            raise ConfigError(why)
    if args.sampler is None:  # not given (a --resume has adopted the stored one by now, if any)
        args.sampler = DEFAULT_SAMPLER
    sampler = resolve_sampler(args.sampler, args.trials, args.scheduler)
    for gap in (joint_modelling_gap(sampler, space), scheduler_gap(sampler, args.scheduler)):
        if gap:
            print(gap, file=sys.stderr, flush=True)
    floors = Floors.for_sweep(str(space.fixed.get("dataset", args.dataset)), args.min_clean_acc, args.min_robust_acc)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":  # on a cluster, each trial checks its data where it runs
        from trainables.data import check_available

        check_available(TrainConfig.from_flat(space.fixed))

    storage = args.storage_path
    local = not is_remote(storage)
    if local:
        storage = str(Path(os.path.expanduser(storage.replace("file://", "", 1))).resolve())
        why = unwritable(Path(storage))
        if why:
            raise ConfigError(f"--storage-path {args.storage_path}: not writable: {why}; accepted: a writable directory or an s3://, gs:// URI")
    else:
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(storage)
        except Exception as e:
            raise ConfigError(f"--storage-path {args.storage_path}: {str(e).splitlines()[0]}") from None
    exp_dir = SweepState(storage, name).exp_dir

    from .mlflow_uri import absolute_tracking_uri
    from .redact import redact

    tracking_uri = absolute_tracking_uri(args.tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        why = unwritable(db.parent) or (None if not db.exists() or os.access(db, os.W_OK) else "read-only file")
        if why:
            raise ConfigError(f"--tracking-uri {args.tracking_uri}: {db} is not writable: {why}; accepted: a writable sqlite path or an http(s):// server")
    elif not tracking_uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql")):
        raise ConfigError(f"--tracking-uri {args.tracking_uri}: unsupported; accepted: sqlite:///PATH, http(s)://HOST:PORT or a database URI")
    elif tracking_uri.startswith(("http://", "https://")):  # MLflow's client retries for minutes
        hp = _host_port(tracking_uri, 443 if tracking_uri.startswith("https") else 80)
        why = hp and _unreachable(*hp)
        if why:
            raise ConfigError(f"--tracking-uri {redact(args.tracking_uri)}: cannot reach {hp[0]}:{hp[1]} ({why}); accepted: a running MLflow server (mlflow server --host 127.0.0.1 ...), or a sqlite:///PATH")

    plan = Plan(args, name, space, storage, exp_dir, local, tracking_uri, address, args.resume, floors=floors)
    if args.resume:
        from ray.tune import Tuner

        stored = plan.state.read_record()
        if stored is None or not Tuner.can_restore(exp_dir):
            raise ConfigError(f"--resume: no sweep named {name!r} under {redact(storage)}; accepted: the --name (and --storage-path) of an earlier sweep")
        plan.stored = stored
        if plan.stored.get("fingerprint") != space.fingerprint():
            raise ConfigError(f"--resume {name}: the space or pinned values differ from the stored sweep's; accepted: leave out --space/--set/--dataset/--epochs/--subset-* to reuse the stored ones, repeat them exactly, or a new --name")
    elif plan.state.exists():
        raise ConfigError(f"sweep {name!r} already exists under {redact(storage)}; accepted: --resume to continue it, or another --name")
    # last, as it may wait a few seconds: ray.init on a dead address retries for minutes
    hp = _host_port(plan.address) if plan.address and plan.address not in ("auto", "local") else None
    why = hp and _unreachable(*hp)
    if why:
        raise ConfigError(f"{'--address' if args.address else 'RAY_ADDRESS'} {redact(plan.address)}: cannot reach the Ray cluster at {hp[0]}:{hp[1]} ({why}); accepted: a running cluster's address (HEAD:6379, see `ray status` on the head), 'auto' on its head node, or no --address (and no RAY_ADDRESS) for a local run")
    return plan


# flags that define a sweep: `--name X --resume` takes them from the stored sweep.json unless given
RESUMED_FLAGS = ("trials", "epochs", "dataset", "sampler", "scheduler", "seed", "grace_period", "tie_break",
                 "min_clean_acc", "min_robust_acc",
                 "reduction_factor", "experiment", "tracking_uri", "register", "study_storage",
                 "cpus_per_trial", "gpus_per_trial", "max_concurrent")
FIXED_ON_RESUME = ("trials", "sampler", "scheduler", "seed", "grace_period", "reduction_factor", "experiment",
                   "tie_break", "min_clean_acc", "min_robust_acc", "max_concurrent", "study_storage")
SPACE_FLAGS = ("space", "set", "dataset", "data_root", "download", "subset_train", "subset_test", "epochs")


def _adopt_stored(args: argparse.Namespace, name: str) -> Space | None:
    """`--name X --resume` (what an interrupted sweep prints) continues the sweep as it was started:
    every flag of RESUMED_FLAGS left at its default takes the stored value, and with none of
    SPACE_FLAGS given the stored space (pinned values included) is used. Returns that space, or
    None when the space is to be built from the flags (and checked against the stored fingerprint)."""
    storage = args.storage_path
    if not is_remote(storage):
        storage = str(Path(os.path.expanduser(storage.replace("file://", "", 1))).resolve())
    try:
        stored = SweepState(storage, name).read_record()
    except (OSError, ValueError, TypeError):  # a bad URI (pyarrow raises these): prepare() says why
        return None
    if stored is None:
        return None  # prepare() says there is no such sweep
    defaults = build_parser().parse_args([])
    explicit_space = any(getattr(args, k) != getattr(defaults, k) for k in SPACE_FLAGS)
    for k in RESUMED_FLAGS:
        v = stored.get(k)
        if v is None or "***" in str(v):  # not stored, or redacted
            continue
        if getattr(args, k) == getattr(defaults, k):
            setattr(args, k, v)
        elif k in FIXED_ON_RESUME and getattr(args, k) != v and not (
                k == "max_concurrent" and min(args.max_concurrent, args.trials) == v):  # stored: capped at --trials
            # Tuner.restore keeps the stored trial count, searcher and scheduler: a new value
            # would be ignored while the sweep reported it, so refuse it
            flag = "--" + k.replace("_", "-")
            raise ConfigError(f"--resume {name}: {flag} {getattr(args, k)} differs from the stored sweep's {v}; "
                              f"accepted: {flag} {v}, or leave {flag} out (a resumed sweep keeps it)")
    desc = stored.get("space")
    if explicit_space or not isinstance(desc, dict):
        return None
    if "***" in json.dumps(desc.get("fixed") or {}):  # sweep.json keeps no credentials
        raise ConfigError(f"--resume {name}: the stored space has values with credentials, which sweep.json does not "
                          f"keep; accepted: the sweep's --space/--set/--dataset/--data-root/--epochs/--subset-* again")
    if desc.get("define_by_run"):  # a space(trial) function: load it again; the fingerprint catches edits
        loaded = load_space(desc["name"])
        return Space(desc["name"], {}, dict(desc.get("fixed") or {}), loaded.func, loaded.source)
    return Space(desc["name"], dict(desc.get("params") or {}), dict(desc.get("fixed") or {}))


def device_refusal(device: Any, gpus: float) -> str | None:
    """Why a pinned `device` cannot work with `gpus` GPUs per trial, or None. A trial sees only
    the GPUs Ray gives it (a fraction is one device), as trainables.tune.trial_device maps them."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return None
    if gpus <= 0:
        return (f"--set device={device} but trials get no GPU (--gpus-per-trial {gpus:g}, or a cluster "
                f"without GPUs); accepted: device=auto or cpu, or --gpus-per-trial > 0 on a cluster with GPUs")
    have = max(1, int(gpus))
    index = device.split(":", 1)[1] if ":" in device else "0"
    if not index.isdigit() or int(index) >= have:
        return (f"--set device={device} but each trial has {have} GPU(s) (--gpus-per-trial {gpus:g}); "
                f"accepted: device=cuda (the trial's own GPU) or cuda:0 to cuda:{have - 1}")
    return None
