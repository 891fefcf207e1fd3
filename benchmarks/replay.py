"""Replay schedulers and samplers over recorded learning curves with a simulated clock.

    python benchmarks/replay.py                          # the committed recording, MO-ASHA vs FIFO, TPE
    python benchmarks/replay.py --methods fifo moasha moasha-epsnet asha oracle --seeds 200
    python benchmarks/replay.py --recording curves_cifar10.parquet --dataset cifar10 --workers 8

A recording (`benchmarks/record_curves.py`) holds every epoch's validation objectives and wall
time for a pool of configurations. A replay is one sweep on that pool: `--workers` asynchronous
workers, each epoch taking the time it took when recorded (the first epoch includes the trial's
start-up, the last its final evaluation), for a budget of simulated time. The sweep's own classes
run inside it: `search.optimizer.ParetoSearch` over the Optuna sampler `make_sampler` builds, and
`search.optimizer.MOASHAScheduler` with the floors, fed each epoch's result as Tune feeds them.

Configurations are drawn from the pool without replacement: the sampler proposes a point of the
space (a real `ask` on the sweep's study), the nearest unused recorded configuration is taken
(normalised distance: log scale where the space samples on one, 1 per differing categorical), the
proposal is told FAIL (samplers ignore FAIL) and the recorded configuration is enqueued, so the
searcher's trial carries exactly the parameters whose curve is replayed. With `--sampler random`
the configuration is drawn uniformly from the unused ones. A worker idles once the pool is used up.

Methods: `fifo` (every trial runs all epochs), `moasha` / `moasha-epsnet` (the CLI's grace period
1, eta 3, with crowding or the epsilon-net), `asha` (Ray's ASHAScheduler on the mean of the
objectives: what a Ray Tune or Optuna user does today), `synetune` (Syne Tune 0.16's MOASHA rung
rule as shipped: its `Bracket` with `NonDominatedPriority`, which returns an argsort that the
bracket then reads as priorities), `synetune-patched` (the same with the argsort turned into
ranks; both without floors, which Syne Tune lacks; they need `pip install syne-tune` importable)
and `oracle` (stops after the first epoch exactly the trials whose final vector is not on the
pool's front: the bound).

Metrics, over `--seeds` replays per method: the hypervolume of the completed feasible trials
against the floors over simulated time; ERT (expected running time) to reach FIFO's median and
75th-percentile final hypervolume: the time all replays ran until they reached it or the budget
ended, divided by the replays that reached it; the area under the hypervolume curve (normalised by
the pool front's hypervolume) over the budget; the rung false-stop rate (share of stopped trials
whose final vector is on the pool's front). Intervals: 95 % bootstrap over replays. The last line
is JSON: `ert_speedup` (FIFO's ERT over the first other method's, to FIFO's median), its interval's
`ert_speedup_ci_low`, `auc_ratio` and `seeds`.
"""
from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainables.contract import DIVERGED, EPOCH, FINAL, MAX_EPOCHS, OBJECTIVES  # noqa: E402

DATA = REPO / "benchmarks" / "data"
RECORDINGS = (DATA / "curves_digits.parquet", DATA / "curves_digits_pilot.parquet")  # the first that exists
METHODS = ("fifo", "moasha", "moasha-epsnet", "asha", "synetune", "synetune-patched", "oracle")
PREFIX = "p_"  # record_curves' parameter columns


@dataclass
class Curve:
    """One recorded configuration: Optuna params, per-epoch objectives and seconds."""

    params: dict[str, Any]
    values: np.ndarray  # epochs x objectives (the last row: the final evaluation)
    seconds: np.ndarray  # per epoch
    diverged: bool

    @property
    def final(self) -> np.ndarray | None:
        return None if self.diverged else self.values[-1]


def load(path: Path) -> tuple[list[Curve], int]:
    import pandas as pd

    df = pd.read_parquet(path)
    epochs = int(df[MAX_EPOCHS].max())
    curves = []
    for _, g in df.sort_values(EPOCH).groupby("config_id"):
        done = bool(g[DIVERGED].any()) or int(g[EPOCH].max()) >= epochs
        if not done:
            continue  # cut off by an interrupted recording
        params = {c[len(PREFIX):]: g[c].iloc[0] for c in g.columns if c.startswith(PREFIX)}
        params = {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
        curves.append(Curve(params, g[list(OBJECTIVES)].to_numpy(float), g["report_s"].to_numpy(float),
                            bool(g[DIVERGED].any())))
    return curves, epochs


@dataclass
class Run:
    """One replay's outcome."""

    curve: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0)])  # (time, hv)
    started: int = 0
    completed: int = 0
    configs: list[int] = field(default_factory=list)  # pool indices, in the order started
    stopped: list[int] = field(default_factory=list)  # pool indices of stopped trials


class Picker:
    """Proposals of the sweep's sampler, mapped to unused recorded configurations."""

    def __init__(self, curves: list[Curve], space: Any, searcher: Any, rng: random.Random, nearest: bool):
        self.curves, self.space, self.searcher, self.rng, self.nearest = curves, space, searcher, rng, nearest
        self.unused = set(range(len(curves)))
        names = sorted(curves[0].params)
        self.cols = []  # (name, kind, scale function)
        for n in names:
            p = space.params.get(n, {})
            if p.get("type") == "categorical" or isinstance(curves[0].params[n], str):
                self.cols.append((n, "cat", None))
            else:
                lo, hi, log = float(p.get("low", 0)), float(p.get("high", 1)), bool(p.get("log"))
                f = (lambda x, lo=lo, hi=hi: (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))) if log \
                    else (lambda x, lo=lo, hi=hi: (x - lo) / (hi - lo))
                self.cols.append((n, "num", f))

    def _distance(self, a: dict[str, Any], b: dict[str, Any]) -> float:
        d = 0.0
        for n, kind, f in self.cols:
            if kind == "cat":
                d += float(a.get(n) != b.get(n))
            elif n in a:
                d += (f(float(a[n])) - f(float(b[n]))) ** 2
        return d

    def next(self, trial_id: str) -> int | None:
        import optuna

        if not self.unused:
            return None
        study = self.searcher.study
        if self.nearest:
            proposal = study.ask()
            self.space.suggest(proposal)
            study.tell(proposal, state=optuna.trial.TrialState.FAIL)
            k = min(sorted(self.unused), key=lambda i: self._distance(proposal.params, self.curves[i].params))
        else:
            k = self.rng.choice(sorted(self.unused))
        self.unused.discard(k)
        study.enqueue_trial(self.curves[k].params)
        self.searcher.suggest(trial_id)
        return k


class SyneTuneRule:
    """Syne Tune 0.16's MOASHA decision (grace 1, eta 3, one bracket) on our maximised objectives
    (negated: Syne Tune minimises). `patched`: NonDominatedPriority's argsort becomes ranks."""

    def __init__(self, epochs: int, patched: bool):
        from syne_tune.optimizer.schedulers.asha import Bracket
        from syne_tune.optimizer.schedulers.multiobjective.multiobjective_priority import NonDominatedPriority

        order = NonDominatedPriority()

        def ranks(x: np.ndarray) -> np.ndarray:
            o = np.asarray(order(x))
            r = np.empty(len(o))
            r[o] = np.arange(len(o))
            return r

        self.bracket = Bracket(1, epochs, 3, 0, ranks if patched else order)

    def stop(self, trial_id: str, epoch: int, vec: np.ndarray) -> bool:
        metrics = {f"m{i}": -float(v) for i, v in enumerate(vec)}
        return str(self.bracket.on_result(trial_id=trial_id, cur_iter=epoch, metrics=metrics)).endswith("STOP")


class _Trial:
    """What a Tune scheduler reads of a trial (hashable, as Ray's ASHA needs)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def replay(curves: list[Curve], epochs: int, method: str, sampler: str, seed: int, workers: int, budget_s: float,
           floors: Any, front: set[int], space: Any) -> Run:
    import optuna
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from search.front import hypervolume
    from search.optimizer import MOASHAScheduler, ParetoSearch, make_sampler

    searcher = ParetoSearch(space, make_sampler(sampler, seed, workers), f"replay-{seed}",
                            optuna.storages.InMemoryStorage(), floors=floors)
    picker = Picker(curves, space, searcher, random.Random(seed), nearest=sampler != "random")
    sched: Any = None
    if method.startswith("moasha"):
        sched = MOASHAScheduler(list(OBJECTIVES), "max", time_attr=EPOCH, grace_period=1, reduction_factor=3,
                                max_t=epochs, tie_break="epsnet" if method.endswith("epsnet") else "crowding",
                                violation=floors.violation)
    elif method == "asha":
        sched = ASHAScheduler(metric="scalar", mode="max", time_attr=EPOCH, max_t=epochs, grace_period=1,
                              reduction_factor=3)
    elif method.startswith("synetune"):
        sched = SyneTuneRule(epochs, patched=method.endswith("patched"))
    run, done, events = Run(), [], []

    def start(w: int, t: float) -> None:
        tid = str(run.started)
        k = picker.next(tid)
        if k is None:
            return
        run.started += 1
        run.configs.append(k)
        trial = _Trial(tid)
        if method == "asha":
            sched.on_trial_add(None, trial)
        heapq.heappush(events, (t + curves[k].seconds[0], w, tid, k, 1, trial))

    for w in range(workers):
        start(w, 0.0)
    while events:
        t, w, tid, k, e, trial = heapq.heappop(events)
        if t > budget_s:
            break
        c = curves[k]
        vec = c.values[e - 1]
        last = e == len(c.values)
        result = {EPOCH: e, MAX_EPOCHS: epochs, FINAL: last and not c.diverged, **dict(zip(OBJECTIVES, map(float, vec)))}
        if last and c.diverged:
            result[DIVERGED] = True
        stop = last
        if not last:
            searcher.on_trial_result(tid, result)
            if method.startswith("moasha"):
                stop = sched.on_trial_result(None, trial, result) == TrialScheduler.STOP
            elif method == "asha":
                stop = sched.on_trial_result(None, trial, {**result, "scalar": float(np.mean(vec))}) == TrialScheduler.STOP
            elif method.startswith("synetune"):
                stop = sched.stop(tid, e, vec)
            elif method == "oracle":
                stop = e == 1 and k not in front
        if stop:
            searcher.on_trial_complete(tid, result)
            if last and not c.diverged and e >= epochs:
                run.completed += 1
                if floors.feasible(dict(zip(OBJECTIVES, vec))):
                    done.append(tuple(map(float, vec)))
                    run.curve.append((t, hypervolume(done, floors.reference())))
            else:
                run.stopped.append(k)
            start(w, t)
        else:
            heapq.heappush(events, (t + c.seconds[e], w, tid, k, e + 1, trial))
    return run


# --- metrics -----------------------------------------------------------------------------------

def hv_at(curve: list[tuple[float, float]], t: float) -> float:
    return max((h for s, h in curve if s <= t), default=0.0)


def first_hit(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, h in curve if h >= target - 1e-12), None)


def ert(runs: list[Run], target: float, budget_s: float) -> float:
    """Expected running time: time of all runs (until the hit, or the budget) / the hits."""
    hits = [first_hit(r.curve, target) for r in runs]
    n = sum(h is not None for h in hits)
    return math.inf if n == 0 else sum(budget_s if h is None else h for h in hits) / n


def auc(run: Run, budget_s: float, hv_max: float) -> float:
    """Area under the hypervolume curve (normalised by the pool front's) over the budget, in [0, 1]."""
    pts = [(s, h) for s, h in run.curve if s <= budget_s] + [(budget_s, None)]
    return sum((pts[i + 1][0] - pts[i][0]) * pts[i][1] for i in range(len(pts) - 1)) / budget_s / hv_max


def bootstrap(fn, n: int, rng: np.random.Generator, reps: int = 1000) -> tuple[float, float]:
    vals = [fn(rng.integers(0, n, n)) for _ in range(reps)]
    vals = [v for v in vals if math.isfinite(v)] or [math.nan]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def hypervolume_of(curves: list[Curve], idx: set[int], floors: Any) -> float:
    from search.front import hypervolume

    pts = [curves[i].final for i in idx if curves[i].final is not None and floors.feasible(dict(zip(OBJECTIVES, curves[i].final)))]
    return hypervolume(pts, floors.reference()) if pts else 0.0


def pool_front(curves: list[Curve], floors: Any) -> set[int]:
    from search.front import non_dominated_mask

    idx = [i for i, c in enumerate(curves) if c.final is not None and floors.feasible(dict(zip(OBJECTIVES, c.final)))]
    mask = non_dominated_mask([curves[i].final for i in idx]) if idx else []
    return {i for i, m in zip(idx, mask) if m}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recording", type=Path, help="record_curves.py's table (default: the committed one)")
    p.add_argument("--dataset", default="digits", help="the recording's dataset (sets the floors)")
    p.add_argument("--space", default="digits", help="the space the recording drew from")
    p.add_argument("--methods", nargs="+", default=["fifo", "moasha"], help=f"from {', '.join(METHODS)}; fifo is the baseline")
    p.add_argument("--sampler", default="tpe", help="the sampler every method uses (tpe: what --sampler auto runs under MO-ASHA)")
    p.add_argument("--seeds", type=int, default=100, help="replays per method")
    p.add_argument("--seed", type=int, default=0, help="the first replay's seed (replay i uses seed + i)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--clock", choices=("recorded", "epochs"), default="recorded",
                   help="recorded: each epoch takes its recorded seconds; epochs: each epoch takes 1 (a "
                        "recording made on a loaded machine, whose times say more about the load)")
    p.add_argument("--full-trials", type=float, help="budget: the simulated time FIFO needs for this many trials "
                   "(default: a quarter of the pool)")
    a = p.parse_args(argv)
    recording = a.recording or next((r for r in RECORDINGS if r.exists()), None)
    bad = [m for m in a.methods if m not in METHODS]
    if recording is None or not recording.exists():
        print(f"error: no recording at {recording or RECORDINGS[0]}; accepted: a table of benchmarks/record_curves.py", file=sys.stderr)
        return 2
    if bad:
        print(f"error: --methods {' '.join(bad)}; accepted: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if any(m.startswith("synetune") for m in a.methods):
        try:
            import syne_tune  # noqa: F401
        except ImportError:
            print("error: --methods synetune needs Syne Tune importable; accepted: pip install syne-tune "
                  "(or its folder on PYTHONPATH)", file=sys.stderr)
            return 2
    if a.seeds < 2 or a.workers < 1:
        print("error: --seeds >= 2 and --workers >= 1 accepted", file=sys.stderr)
        return 2
    import optuna

    from search.front import Floors, hypervolume
    from search.optimizer import load_space

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("search").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    curves, epochs = load(recording)
    if a.clock == "epochs":
        for c in curves:
            c.seconds = np.ones_like(c.seconds)
    floors = Floors.for_sweep(a.dataset)
    space = load_space(a.space)
    front = pool_front(curves, floors)
    finals = [c.final for c in curves if c.final is not None and floors.feasible(dict(zip(OBJECTIVES, c.final)))]
    hv_max = hypervolume(finals, floors.reference())
    full_s = float(np.mean([c.seconds.sum() for c in curves if not c.diverged]))
    full_trials = a.full_trials or max(1.0, len(curves) / 4)
    budget_s = full_trials * full_s / a.workers
    methods = ["fifo", *[m for m in a.methods if m != "fifo"]]
    print(f"recording {recording.name}: {len(curves)} configs x {epochs} epochs, {len(front)} on the pool's front "
          f"(hypervolume {hv_max:.4f}); a full trial {full_s:.0f} s ({a.clock} clock); budget "
          f"{budget_s:.0f} s simulated ({full_trials:g} full trials on {a.workers} workers); sampler {a.sampler}; {a.seeds} replays per method")
    runs: dict[str, list[Run]] = {}
    for m in methods:
        t0 = time.perf_counter()
        runs[m] = [replay(curves, epochs, m, a.sampler, a.seed + i, a.workers, budget_s, floors, front, space)
                   for i in range(a.seeds)]
        print(f"  {m}: {a.seeds} replays in {time.perf_counter() - t0:.1f} s", flush=True)
    fifo_final = [hv_at(r.curve, budget_s) for r in runs["fifo"]]
    targets = {"median": float(np.median(fifo_final)), "p75": float(np.percentile(fifo_final, 75))}
    rng = np.random.default_rng(a.seed)
    n = a.seeds
    rows, summary = [], {}
    for m in methods:
        rs = runs[m]
        row: dict[str, Any] = {"method": m}
        for name, target in targets.items():
            e = ert(rs, target, budget_s)
            e_fifo = ert(runs["fifo"], target, budget_s)
            row[f"ert_{name}"] = e / budget_s
            row[f"speedup_{name}"] = e_fifo / e
            row[f"speedup_{name}_ci"] = bootstrap(
                lambda ix, t=target, rs=rs: ert([runs["fifo"][i] for i in ix], t, budget_s) / ert([rs[i] for i in ix], t, budget_s),
                n, rng)
        aucs = np.array([auc(r, budget_s, hv_max) for r in rs])
        fifo_aucs = np.array([auc(r, budget_s, hv_max) for r in runs["fifo"]])
        row["auc"] = float(aucs.mean())
        row["auc_ratio"] = float(aucs.mean() / fifo_aucs.mean()) if fifo_aucs.mean() > 0 else math.nan
        row["auc_ratio_ci"] = bootstrap(lambda ix, x=aucs, f=fifo_aucs: x[ix].mean() / f[ix].mean(), n, rng)
        stopped = [k for r in rs for k in r.stopped]
        row["false_stop"] = sum(k in front for k in stopped) / len(stopped) if stopped else math.nan
        row["started"] = float(np.mean([r.started for r in rs]))
        row["completed"] = float(np.mean([r.completed for r in rs]))
        row["final_hv"] = float(np.median([hv_at(r.curve, budget_s) for r in rs]))
        rows.append(row)
        summary[m] = row
    print(f"\ntargets: FIFO's median final hypervolume {targets['median']:.4f}, 75th percentile {targets['p75']:.4f}; "
          f"ERT in budgets (1.0 = the whole budget); intervals: 95 % bootstrap over replays\n")
    print("| method | ERT to median (speed-up, interval) | ERT to p75 (speed-up, interval) | HV-AUC (ratio, interval) "
          "| false-stop rate | trials started / completed | median final HV |\n|---|---|---|---|---|---|---|")
    def cell(r: dict[str, Any], name: str) -> str:
        lo, hi = r[f"speedup_{name}_ci"]
        return f"{r[f'ert_{name}']:.2f} ({r[f'speedup_{name}']:.2f}x, {lo:.2f}-{hi:.2f})"

    for r in rows:
        lo, hi = r["auc_ratio_ci"]
        fs = "" if math.isnan(r["false_stop"]) else f"{r['false_stop']:.1%}"
        print(f"| {r['method']} | {cell(r, 'median')} | {cell(r, 'p75')} | {r['auc']:.3f} ({r['auc_ratio']:.2f}x, {lo:.2f}-{hi:.2f}) "
              f"| {fs} | {r['started']:.1f} / {r['completed']:.1f} | {r['final_hv']:.4f} |")
    head = summary[methods[1]] if len(methods) > 1 else summary["fifo"]
    print(json.dumps({"method": head["method"], "sampler": a.sampler, "recording": recording.name,
                      "ert_speedup": round(head["speedup_median"], 3),
                      "ert_speedup_ci_low": round(head["speedup_median_ci"][0], 3),
                      "ert_speedup_p75": round(head["speedup_p75"], 3), "auc_ratio": round(head["auc_ratio"], 3),
                      "seeds": a.seeds, "seed": a.seed, "clock": a.clock}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
