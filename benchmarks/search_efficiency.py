"""Search efficiency under a fixed budget of training epochs: hypervolume against epochs consumed.

    python benchmarks/search_efficiency.py --quick        # digits only (9 methods x 5 seeds = 45 sweeps of 48 epochs)
    python benchmarks/search_efficiency.py                # digits and a CIFAR-10 subset
    python benchmarks/search_efficiency.py --quick --full-trials 24 --set batch_size=16   # variants

Compares ways to spend the same budget (total training epochs over all trials) on the same
search (spaces/digits.py, the paper's space sized for a few epochs, on both datasets; three
objectives measured on the validation split: clean accuracy, robust accuracy, channel sparsity):
each sampler (random, nsga2, tpe, gp; search.optimizer) with
FIFO (every trial runs all its epochs) and with the MO-ASHA scheduler (search.optimizer.MOASHAScheduler: stopped
trials hand their epochs to new ones, so it starts more trials within the budget), and
gp+moasha-epsnet (MO-ASHA with Syne Tune's epsilon-net tie-break instead of crowding distance).

Each sweep is the sweep `python -m search.pareto` runs (`search.driver.prepare` and
`build_tuner`, in-process, one Ray instance for all sweeps, actors reused between trials),
plus a callback that counts epochs and recomputes the hypervolume of the completed trials
(`search.front.hypervolume`, reference = the sweep's floors: chance clean accuracy, robust 0,
sparsity 0; trials below a floor do not count) whenever one completes, exactly as the parent
MLflow run's `hypervolume` metric does, and stops the sweep once the budget is spent. A
FIFO sweep gets budget / epochs trials; the MO-ASHA sweep gets as many as the budget could start
and is stopped by the budget. Epochs of trials still running at that point count as spent.

Reported per dataset and method, over the seeds: the final hypervolume (mean +- sd) and the
fraction of the budget at which the method first reaches random search's final hypervolume
(the target is the mean over seeds of random search's hypervolume at the full budget; a seed that
never reaches it counts as 1.0, so a mean with unreached seeds is a lower bound, marked ">="),
with a 90 % interval of that mean when the seeds are drawn again with replacement (the target
recomputed each time): one seed more or less moves a 5-seed mean by about 0.1.
Plots: docs/img/search_efficiency_<dataset>.png. The last stdout line is a JSON object whose
`moasha_budget_fraction` is the mean over the digits seeds of MO-ASHA with the CLI defaults
(`tpe+moasha`: `--sampler auto` is TPE under MO-ASHA, and `--tie-break crowding`; the CIFAR-10
and combined figures are beside it).

The hypervolume-vs-epochs measure does not depend on wall time, so a busy machine changes how
long this takes, not its numbers (beyond the order in which parallel trials reach the rungs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from trainables.data import unpack_archive

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository into its own folder with shared/ beside it
SHARED_CIFAR = REPO.parent / "shared/data/cifar10-jpeg.tar.gz"
DEFAULT_CACHE = Path("~/.cache/brsearch")

METHODS: dict[str, tuple[str, str, str]] = {  # name -> (--sampler, --scheduler, --tie-break)
    "random": ("random", "fifo", "crowding"),
    "nsga2": ("nsga2", "fifo", "crowding"),
    "tpe": ("tpe", "fifo", "crowding"),
    "gp": ("gp", "fifo", "crowding"),
    "random+moasha": ("random", "moasha", "crowding"),
    "nsga2+moasha": ("nsga2", "moasha", "crowding"),
    "tpe+moasha": ("tpe", "moasha", "crowding"),
    "gp+moasha": ("gp", "moasha", "crowding"),
    "gp+moasha-epsnet": ("gp", "moasha", "epsnet"),
}
BASELINE = "random"
# --scheduler moasha with the CLI defaults: --sampler auto (TPE under MO-ASHA) and --tie-break crowding;
# `gp` is what auto runs with FIFO below GP_TRIALS trials (checked in run_sweep)
MOASHA = "tpe+moasha"
TARGET_FRACTION = 0.5


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    epochs: int  # per full trial
    full_trials: int  # budget = full_trials * epochs
    grace_period: int  # MO-ASHA rungs: grace_period * reduction_factor**j < epochs
    reduction_factor: float
    flags: tuple[str, ...]  # search.pareto flags: data and model size

    @property
    def budget(self) -> int:
        return self.full_trials * self.epochs


# batch 32: 15 optimizer steps per epoch on 480 training images, enough for the group penalty to
# zero whole channels within a trial (at the default 128 only 4 steps: every model stays dense
# and the hypervolume above the floor is 0 for most sweeps)
_TINY = ("--set", "depth=8", "--set", "attack_steps=2", "--set", "proxy_eval_size=128", "--set", "cw=false",
         "--set", "batch_size=32")

DIGITS = Setting(
    key="digits", label="digits (600 train / 200 test, EnResNet-8 width 4, PGD-2 training)",
    epochs=4, full_trials=12, grace_period=1, reduction_factor=3,
    flags=("--dataset", "digits", "--subset-train", "600", "--subset-test", "200", "--set", "width=4", *_TINY),
)


def cifar_setting(folder: Path) -> Setting:
    return Setting(
        key="cifar", label="CIFAR-10 subset (1000 train / 300 test, EnResNet-8 width 8, PGD-2 training, short-budget space)",
        epochs=4, full_trials=12, grace_period=1, reduction_factor=3,
        # the budget-sized space (group penalty in [0.02, 2]): with the paper space's [1e-6, 3]
        # almost no trial zeroes a channel in 4 epochs and every hypervolume is ~0 (docs/benchmarks.md)
        flags=("--dataset", f"folder:{folder}", "--subset-train", "1000", "--subset-test", "300",
               "--space", "digits", "--set", "width=8", *_TINY),
    )


# ------------------------------------------------------------------------------------------
# data


def cifar_folder(args: argparse.Namespace) -> Path:
    if args.cifar_dir:
        folder = Path(os.path.expanduser(args.cifar_dir))
        if folder.is_file():  # an archive
            return unpack_archive(folder, Path(os.path.expanduser(args.cache_dir)))
        return folder
    if not SHARED_CIFAR.is_file():
        raise SystemExit(f"error: CIFAR-10 not found at {SHARED_CIFAR}; pass --cifar-dir (an unpacked "
                         f"train/<class>/, test/<class>/ folder or the .tar.gz), or --quick for digits only")
    return unpack_archive(SHARED_CIFAR, Path(os.path.expanduser(args.cache_dir)))


# ------------------------------------------------------------------------------------------
# one sweep


def _budget_tools(budget: int, floors: Any) -> tuple[Any, Any]:
    """A Tune Callback that counts epochs and records the hypervolume curve, and a Stopper that
    ends the experiment once the budget is spent."""
    from ray.tune import Callback
    from ray.tune.stopper import Stopper

    from search.front import hypervolume
    from search.results import trial_outcome
    from trainables.contract import OBJECTIVES

    class EpochBudget(Callback):
        def __init__(self) -> None:
            self.budget = budget
            self.consumed = 0  # epochs reported by all trials (Tune passes no duplicate results here)
            self.points: list[list[float]] = []
            self.curve: list[tuple[int, float]] = [(0, 0.0)]
            self.events: list[dict[str, Any]] = []
            self.started: set[str] = set()
            self.ended: set[str] = set()
            self.results: list[dict[str, Any]] = []  # every report: for replaying rung rules offline

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.consumed += 1
            first = trial.trial_id not in self.started
            self.started.add(trial.trial_id)
            self.results.append({"trial_id": trial.trial_id, "epoch": result.get("epoch"),
                                 "values": [result.get(m) for m in OBJECTIVES],
                                 **({"config": dict(trial.config)} if first else {})})
            # A trial is complete with its final report. (Waiting for on_trial_complete would miss
            # the trial whose last epoch spends the budget: Tune stops the experiment's remaining
            # trials without calling the callbacks' on_trial_complete.)
            if result.get("final") and result.get("epoch", 0) >= result.get("max_epochs", 1):
                self._end(trial.trial_id, "completed", result)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._end(trial.trial_id, *trial_outcome(trial)[:1], trial.last_result or {})

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._end(trial.trial_id, "failed", trial.last_result or {})

        def _end(self, trial_id: str, status: str, last: dict) -> None:
            if trial_id in self.ended:
                return
            self.ended.add(trial_id)
            self.events.append({"consumed": self.consumed, "trial_id": trial_id, "status": status,
                                "epoch": last.get("epoch")})
            if status != "completed":
                return
            vec = [float(last[m]) for m in OBJECTIVES]
            if all(math.isfinite(v) for v in vec):
                self.points.append(vec)
                feasible = [p for p in self.points if floors.feasible(dict(zip(OBJECTIVES, p)))]
                self.curve.append((self.consumed, hypervolume(feasible, floors.reference())))

    class StopAtBudget(Stopper):
        def __init__(self, rec: EpochBudget) -> None:
            self.rec = rec

        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.rec.consumed >= self.rec.budget

    rec = EpochBudget()
    return rec, StopAtBudget(rec)


def run_sweep(setting: Setting, method: str, seed: int, work: Path, concurrency: int) -> dict[str, Any]:
    from search.driver import Flags, Resources, TunerOptions, build_tuner, prepare
    from search.optimizer import GP_TRIALS, settle_sampled_ahead

    sampler, scheduler, tie_break = METHODS[method]
    name = f"{setting.key}-{method.replace('+', '-')}-s{seed}"
    sweeps = work / "sweeps"
    shutil.rmtree(sweeps / name, ignore_errors=True)  # a sweep interrupted earlier starts over
    # MO-ASHA: as many trials as the budget could start (each costs >= 1 epoch); the budget stops it
    trials = setting.full_trials if scheduler == "fifo" else setting.budget
    assert method != "gp" or trials < GP_TRIALS, "gp stands for --sampler auto (FIFO) only below GP_TRIALS trials"
    argv = ["--name", name, "--sampler", sampler, "--scheduler", scheduler, "--seed", str(seed),
            "--trials", str(trials), "--epochs", str(setting.epochs), "--max-concurrent", str(concurrency),
            "--grace-period", str(setting.grace_period), "--reduction-factor", str(setting.reduction_factor),
            "--tie-break", tie_break,
            "--storage-path", str(sweeps), "--tracking-uri", f"sqlite:///{work / 'unused-mlflow.db'}",
            "--quiet", *setting.flags]
    plan = prepare(Flags.parse(argv))
    plan.location.state_dir.mkdir(parents=True, exist_ok=True)
    rec, stopper = _budget_tools(setting.budget, plan.floors)
    tuner = build_tuner(plan, Resources(1.0, 0.0, concurrency, "benchmark"), [rec],
                        TunerOptions(stop=stopper, reuse_actors=True))
    t0 = time.perf_counter()
    tuner.fit()
    settle_sampled_ahead()
    wall = time.perf_counter() - t0
    statuses = [e["status"] for e in rec.events]
    return {
        "setting": setting.key, "method": method, "seed": seed, "budget": setting.budget,
        "consumed": rec.consumed, "curve": [list(p) for p in rec.curve],
        "trials_started": len(rec.started), "completed": statuses.count("completed"),
        "stopped": statuses.count("stopped"), "failed": statuses.count("failed"),
        "points": rec.points, "events": rec.events, "results": rec.results, "wall_s": round(wall, 1),
        "reference": list(plan.floors.reference()),
    }


# ------------------------------------------------------------------------------------------
# analysis


def hv_at(curve: list[list[float]], epochs: float) -> float:
    """The hypervolume after `epochs` epochs were consumed (a step function of completions)."""
    return max((hv for e, hv in curve if e <= epochs), default=0.0)


def first_reach(curve: list[list[float]], target: float, budget: int) -> float | None:
    """Fraction of the budget at which the curve first reaches target; None if it never does."""
    for e, hv in curve:
        if e <= budget and hv >= target - 1e-12 and hv > 0:
            return e / budget
    return None


def recompute_curve(run: dict[str, Any], objectives: list[str]) -> list[list[float]]:
    """The run's hypervolume curve over a subset of the objectives (a sensitivity check), from
    the recorded points: curve[i + 1] is the curve after points[i] completed."""
    from search.front import hypervolume
    from trainables.contract import OBJECTIVES

    dims = [OBJECTIVES.index(o) for o in objectives]
    full_ref = run["reference"]
    ref = [full_ref[d] for d in dims]
    feasible = [p[0] > full_ref[0] and p[1] >= full_ref[1] for p in run["points"]]
    pts = [[p[d] for d in dims] if ok else [r - 1 for r in ref] for p, ok in zip(run["points"], feasible)]
    return [[0, 0.0]] + [[c, hypervolume(pts[: i + 1], ref)] for i, (c, _) in enumerate(run["curve"][1:])]


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def mean_fraction(fractions: list[float | None]) -> float:
    """Mean over seeds of first_reach's fractions, a seed that never reaches the target as 1.0."""
    return statistics.fmean(1.0 if f is None else f for f in fractions)


def bootstrap_interval(by: dict[str, list[dict[str, Any]]], budget: int, resamples: int = 1000,
                       level: float = 0.9) -> dict[str, tuple[float, float]]:
    """Percentile interval of each method's mean budget fraction when the seeds are drawn again
    (with replacement, the same draw for every method, the target recomputed from random search's
    drawn seeds): how far a run with other seeds could land. Fixed RNG: reproducible."""
    seeds = sorted(set.intersection(*(set(r["seed"] for r in rs) for rs in by.values() if rs)))
    if len(seeds) < 2:
        return {}
    curves = {m: {r["seed"]: r["curve"] for r in rs} for m, rs in by.items() if rs}
    rng, draws = random.Random(0), {m: [] for m in curves}
    for _ in range(resamples):
        pick = [rng.choice(seeds) for _ in seeds]
        target = statistics.fmean(hv_at(curves[BASELINE][k], budget) for k in pick)
        for m, cs in curves.items():
            draws[m].append(mean_fraction([first_reach(cs[k], target, budget) for k in pick]))
    lo, hi = (1 - level) / 2, (1 + level) / 2
    for d in draws.values():
        d.sort()
    return {m: (d[int(lo * (len(d) - 1))], d[int(hi * (len(d) - 1))]) for m, d in draws.items()}


def summarize(setting: Setting, runs: list[dict[str, Any]]) -> dict[str, Any]:
    budget = setting.budget
    by = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in METHODS}
    base = [hv_at(r["curve"], budget) for r in by[BASELINE]]
    target = statistics.fmean(base) if base else float("nan")
    interval = bootstrap_interval(by, budget)
    out: dict[str, Any] = {"budget_epochs": budget, "epochs_per_trial": setting.epochs,
                           "target_hv": target, "methods": {}}
    for m, rs in by.items():
        if not rs:
            continue
        finals = [hv_at(r["curve"], budget) for r in rs]
        fracs = [first_reach(r["curve"], target, budget) for r in rs]
        # secondary: where the mean-over-seeds curve (the thick line in the plot) reaches the target
        mean_curve = [[e, statistics.fmean(hv_at(r["curve"], e) for r in rs)] for e in range(budget + 1)]
        out["methods"][m] = {
            "seeds": [r["seed"] for r in rs],
            "final_hv": finals, "final_hv_mean": statistics.fmean(finals), "final_hv_sd": _sd(finals),
            "budget_fraction": fracs, "budget_fraction_mean": mean_fraction(fracs),
            "budget_fraction_interval": interval.get(m),
            "reached": sum(f is not None for f in fracs), "lower_bound": any(f is None for f in fracs),
            "mean_curve_fraction": first_reach(mean_curve, target, budget),
            "trials_started_mean": statistics.fmean(r["trials_started"] for r in rs),
            "completed_mean": statistics.fmean(r["completed"] for r in rs),
            "stopped_mean": statistics.fmean(r["stopped"] for r in rs),
            "wall_s": sum(r["wall_s"] for r in rs),
        }
    return out


def format_table(setting: Setting, summary: dict[str, Any]) -> str:
    n = max(len(v["seeds"]) for v in summary["methods"].values())
    lines = [
        f"{setting.label}: budget {summary['budget_epochs']} epochs ({setting.full_trials} full trials of "
        f"{setting.epochs} epochs), {n} seeds; target = random search's final hypervolume "
        f"{summary['target_hv']:.4f} (mean over seeds)",
        "",
        "| method | final hypervolume (mean ± sd) | budget fraction to reach random's final HV | "
        "90 % interval (seeds redrawn) | seeds reaching it | mean curve reaches it at | "
        "trials started / completed (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, v in summary["methods"].items():
        frac = ("≥ " if v["lower_bound"] else "") + f"{v['budget_fraction_mean']:.2f}"
        per_seed = ", ".join("not reached" if f is None else f"{f:.2f}" for f in v["budget_fraction"])
        mc = "not reached" if v["mean_curve_fraction"] is None else f"{v['mean_curve_fraction']:.2f}"
        iv = v["budget_fraction_interval"]
        iv = "–" if iv is None else f"{iv[0]:.2f}-{iv[1]:.2f}"
        lines.append(f"| {m} | {v['final_hv_mean']:.4f} ± {v['final_hv_sd']:.4f} | {frac} ({per_seed}) | {iv} | "
                     f"{v['reached']}/{len(v['seeds'])} | {mc} | "
                     f"{v['trials_started_mean']:.1f} / {v['completed_mean']:.1f} |")
    return "\n".join(lines)


COLOURS = {"random": "tab:gray", "nsga2": "tab:blue", "tpe": "tab:green", "gp": "tab:purple",
           "random+moasha": "silver", "nsga2+moasha": "tab:cyan", "tpe+moasha": "tab:red",
           "gp+moasha": "tab:pink", "gp+moasha-epsnet": "tab:orange"}
STYLES = {m: ("--" if "moasha" in m else "-") for m in COLOURS}


def plot(setting: Setting, runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budget = setting.budget
    grid = np.arange(0, budget + 1)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        curves = np.array([[hv_at(r["curve"], e) for e in grid] for r in rs])
        for c in curves:
            ax.step(grid, c, where="post", color=COLOURS[m], alpha=0.18, lw=0.9)
        v = summary["methods"][m]
        frac = ("≥" if v["lower_bound"] else "") + f"{v['budget_fraction_mean']:.2f}"
        ax.step(grid, curves.mean(axis=0), where="post", color=COLOURS[m], lw=2.2, ls=STYLES[m],
                label=f"{m} (reaches target at {frac} of budget)")
    ax.axhline(summary["target_hv"], color="black", ls="--", lw=1, label="random search's final HV (mean)")
    ax.set_xlim(0, budget)
    ax.set_xlabel("training epochs consumed (all trials)")
    ax.set_ylabel("hypervolume of the completed trials")
    n = max(len(v["seeds"]) for v in summary["methods"].values())
    ax.set_title(f"{setting.label}\nmean over {n} seeds (thin: single seeds)", fontsize=9.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/search_efficiency.py",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="sampler seeds (default 0..4)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--datasets", nargs="+", choices=["digits", "cifar"],
                   help="default: digits, plus cifar unless --quick")
    p.add_argument("--cifar-dir", help="unpacked CIFAR-10 JPEG folder (train/<class>/, test/<class>/) or "
                                       f"the .tar.gz (default: unpack {SHARED_CIFAR} once into --cache-dir)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--concurrency", type=int, default=2, help="trials at once = Ray CPUs (default 2)")
    p.add_argument("--full-trials", type=int, help="budget = this many full trials per sweep, every dataset "
                                                   "(default 12; results and plots get a -<N>t suffix)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training option for every sweep, after the setting's own (search.pareto's --set, "
                        "repeatable; results and plots get a -KEYVALUE suffix)")
    p.add_argument("--work-dir", help="keep each finished sweep's curve here and reuse it when rerun "
                                      "(default: a temporary folder)")
    p.add_argument("--img-dir", default=str(REPO / "docs" / "img"), help="where the plots go")
    p.add_argument("--json", help="also write the full results (curves included) here")
    p.add_argument("--hv-objectives", nargs="+", choices=["clean_acc", "robust_acc", "channel_sparsity"],
                   help="sensitivity check: the hypervolume over these objectives only, recomputed from "
                        "the recorded points (with --work-dir, finished sweeps are reused); the plots get "
                        "a suffix")
    return p


def variants(settings: list[Setting], args: argparse.Namespace) -> list[Setting]:
    """The settings with --full-trials and --set applied. Each variant gets its own key, so a
    --work-dir never reuses sweeps run under another budget or other training options."""
    if args.full_trials:
        settings = [replace(st, key=f"{st.key}-{args.full_trials}t", full_trials=args.full_trials) for st in settings]
    if args.set:
        from search.optimizer import parse_sets
        from trainables.config import ConfigError

        try:
            sets = parse_sets(args.set)  # refuses an unknown option or a bad value before any sweep runs
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        tag = "-".join(f"{k}{v}" for k, v in sets.items())
        extra = tuple(x for item in args.set for x in ("--set", item))  # later --set wins in search.pareto
        settings = [replace(st, key=f"{st.key}-{tag}", flags=(*st.flags, *extra)) for st in settings]
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or len(set(args.seeds)) < 1:
        raise SystemExit("error: --concurrency must be >= 1 and at least one seed is needed")
    if args.full_trials is not None and args.full_trials < 1:
        raise SystemExit(f"error: --full-trials {args.full_trials}: give a positive count")
    datasets = args.datasets or (["digits"] if args.quick else ["digits", "cifar"])
    if BASELINE not in args.methods:
        raise SystemExit(f"error: --methods must include {BASELINE} (the target)")
    settings = variants([DIGITS if d == "digits" else cifar_setting(cifar_folder(args)) for d in datasets], args)

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TensorBoard files
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import logging

    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="search-efficiency-")
        work = Path(tmp.name)
    t_start = time.perf_counter()
    # "local": a new instance even where `ray start` left a cluster that ray.init would auto-detect
    ray.init(address="local", num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    try:
        for setting in settings:
            runs = []
            for seed in args.seeds:
                for method in args.methods:  # sweeps run one after another (one Ray instance)
                    cache = work / "curves" / f"{setting.key}-{method.replace('+', '-')}-s{seed}.json"
                    key = json.loads(json.dumps({"setting": asdict(setting), "method": method, "seed": seed,
                                                 "concurrency": args.concurrency}))  # tuples as lists
                    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
                        run = json.loads(cache.read_text())["run"]
                        print(f"[{setting.key}] {method:13s} seed {seed}: reused {cache}", file=sys.stderr)
                    else:
                        run = run_sweep(setting, method, seed, work, args.concurrency)
                        cache.parent.mkdir(parents=True, exist_ok=True)
                        cache.write_text(json.dumps({"key": key, "run": run}))
                    runs.append(run)
                    print(f"[{setting.key}] {method:13s} seed {seed}: HV {hv_at(run['curve'], setting.budget):.4f} "
                          f"after {min(run['consumed'], setting.budget)}/{setting.budget} epochs; "
                          f"{run['trials_started']} trials started, {run['completed']} completed, "
                          f"{run['stopped']} stopped; {run['wall_s']:.0f}s "
                          f"(total {time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)
            suffix = ""
            if args.hv_objectives and len(args.hv_objectives) < 3:
                runs = [{**r, "curve": recompute_curve(r, args.hv_objectives)} for r in runs]
                suffix = "_" + "-".join(args.hv_objectives)
                print(f"[{setting.key}] hypervolume over {', '.join(args.hv_objectives)} only", file=sys.stderr)
            summary = summarize(setting, runs)
            png = plot(setting, runs, summary, Path(args.img_dir) / f"search_efficiency_{setting.key}{suffix}.png")
            results[setting.key] = {"setting": asdict(setting), "summary": summary, "runs": runs, "plot": str(png)}
            print("\n" + format_table(setting, summary) + f"\n\nplot: {png}\n", flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    wall = time.perf_counter() - t_start
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "wall_s": wall}, indent=1))
    out: dict[str, Any] = {}
    fr = {k: v["summary"]["methods"].get(MOASHA, {}).get("budget_fraction_mean") for k, v in results.items()}
    basis = "digits" if "digits" in results else next(iter(results))
    out["moasha_budget_fraction"] = fr.get(basis)
    out["moasha_budget_fraction_basis"] = f"{basis}: mean over seeds {args.seeds}"
    out["moasha_budget_fraction_interval"] = results[basis]["summary"]["methods"].get(MOASHA, {}).get(
        "budget_fraction_interval")
    for k in results:
        out[f"moasha_budget_fraction_{k}"] = fr[k]
    if len(results) > 1 and all(v is not None for v in fr.values()):
        out["moasha_budget_fraction_combined"] = statistics.fmean(fr.values())
    out["target"] = TARGET_FRACTION
    out["target_met"] = out["moasha_budget_fraction"] is not None and out["moasha_budget_fraction"] <= TARGET_FRACTION
    out["per_method"] = {
        k: {m: {"final_hv_mean": round(v["final_hv_mean"], 5), "final_hv_sd": round(v["final_hv_sd"], 5),
                "budget_fraction_mean": round(v["budget_fraction_mean"], 3),
                "budget_fraction_interval": v["budget_fraction_interval"] and [round(x, 3) for x in v["budget_fraction_interval"]],
                "reached": f"{v['reached']}/{len(v['seeds'])}", "mean_curve_fraction": v["mean_curve_fraction"],
                "trials_started_mean": v["trials_started_mean"], "completed_mean": v["completed_mean"]}
            for m, v in res["summary"]["methods"].items()}
        for k, res in results.items()
    }
    out["budget_epochs"] = {k: res["summary"]["budget_epochs"] for k, res in results.items()}
    out["wall_s"] = round(wall, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
