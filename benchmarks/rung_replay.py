"""Which MO-ASHA settings could reach random search's hypervolume sooner? Replays on recorded trials.

    python benchmarks/search_efficiency.py --quick --work-dir /tmp/se --methods random   # records a pool
    python benchmarks/rung_replay.py --pool '/tmp/se/curves/digits-random-s*.json'
    python benchmarks/rung_replay.py --build 9 --seeds 100 101 102 103 104 105 106 107 108 109 \\
        --work-dir /tmp/pool9                                                  # 9-epoch trials

A random FIFO sweep of `benchmarks/search_efficiency.py` records every trial's objectives after
every epoch. Such trials form a pool; this script replays, on the pool, random search (FIFO: 12
trials run to the end), random search under MO-ASHA (`search.optimizer.MOASHAScheduler` with the
floors, as the CLI builds it, fed each epoch's result as Tune feeds it) for every grace period,
reduction factor and tie-break, and random search under an oracle that stops, after epoch 1,
exactly the trials whose final vector adds no hypervolume (dense or below the floor): no rule
that sees only the past can stop better, so the oracle bounds what a rung rule can buy with this
sampler. All with 2 trials at once in lock-step epochs and the same epoch budget (12 full trials).
Each replay draws the trials in a new random order; the figure is search_efficiency's: the
fraction of the budget at which the hypervolume of the completed trials first reaches random
FIFO's mean final hypervolume (never: 1.0), averaged over `--replays`. Trials are drawn from the
pool without replacement (a new permutation when it is used up). `benchmarks/replay.py` replays
recorded 27-epoch curves with a simulated clock, ERT and a real oracle bound instead. Consecutive groups of 5
replays stand for one 5-seed run of search_efficiency: the table gives the sd of such a run's
mean and how often a run meets <= 0.5.

It also prints, per epoch, how many trials already show channel sparsity > 0: a rung before
sparsity shows ranks by accuracy alone, and the hypervolume (reference: the floor, sparsity 0)
counts sparse models only. The sampler is random here, so this isolates the scheduler; a model-
based sampler changes which trials enter, not how a rung ranks them. `--build E` first runs random
FIFO sweeps with E epochs per trial (search_efficiency's digits setting otherwise) into
`--work-dir`. The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import search_efficiency as se  # noqa: E402
from ray.tune.schedulers import TrialScheduler  # noqa: E402

from search.front import Floors, hypervolume  # noqa: E402
from search.optimizer import TIE_BREAKS, MOASHAScheduler  # noqa: E402
from trainables.contract import OBJECTIVES  # noqa: E402

FLOORS = Floors.for_sweep("digits")
WORKERS, FULL_TRIALS = 2, 12
SEEDS = 5  # search_efficiency's seeds per method: one of its runs averages 5 sweeps


def load_pool(paths: list[str]) -> list[list[list[float]]]:
    """Trajectories (per epoch: clean, robust, sparsity) of the trials that ran every epoch."""
    pool = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        by: dict[str, dict[int, list[float]]] = {}
        for r in doc.get("run", doc)["results"]:
            by.setdefault(r["trial_id"], {})[r["epoch"]] = r["values"]
        for epochs in by.values():
            n = max(epochs)
            if all(e in epochs for e in range(1, n + 1)):
                pool.append([epochs[e] for e in range(1, n + 1)])
    lengths = {len(t) for t in pool}
    if len(lengths) != 1:
        raise SystemExit(f"error: the pool mixes trials of {sorted(lengths)} epochs; give one setting's runs")
    return pool


def hv(points: list[list[float]]) -> float:
    feasible = [p for p in points if FLOORS.feasible(dict(zip(OBJECTIVES, p)))]
    return hypervolume(feasible, FLOORS.reference()) if feasible else 0.0


def useless(trial: list[list[float]]) -> bool:
    """Its final vector adds no hypervolume: dense (sparsity 0, the reference) or below a floor."""
    clean, robust, sparsity = trial[-1]
    return sparsity <= 0 or not FLOORS.feasible(dict(zip(OBJECTIVES, trial[-1])))


def draw_order(n: int, draws: int, rng: random.Random) -> list[int]:
    """`draws` pool indices, popped from the end: without replacement while the pool lasts, then
    from a fresh permutation, so a rule that starts more trials is not handed repeats earlier."""
    out: list[int] = []
    while len(out) < draws:
        out.extend(rng.sample(range(n), n))
    return out[:draws][::-1]


def replay(pool, budget: int, rng: random.Random, rung: tuple[int, float, str] | str | None) -> list[tuple[int, float]]:
    """One sweep on the pool: FIFO (rung None), MO-ASHA (grace, eta, tie-break; with the floors) or
    "oracle": after epoch 1, stop exactly the trials that will end `useless` (it reads the future).
    Returns the hypervolume curve [(epochs consumed, hypervolume)]."""
    epochs = len(pool[0])
    order = draw_order(len(pool), budget + WORKERS, rng)  # every trial consumes >= 1 epoch: never runs out
    sched = None
    if isinstance(rung, tuple):  # the sweep's own scheduler, fed every epoch's result (it reads only trial.trial_id)
        grace, eta, tie = rung
        sched = MOASHAScheduler(list(OBJECTIVES), "max", time_attr="epoch", grace_period=grace,
                                reduction_factor=eta, max_t=epochs, tie_break=tie,
                                violation=FLOORS.violation)
    # slot: [pool index, epochs done, the trial as the scheduler sees it]
    running: list[list[Any] | None] = [[order.pop(), 0, SimpleNamespace(trial_id=str(i))] for i in range(WORKERS)]
    started, consumed, done, curve = WORKERS, 0, [], [(0, 0.0)]
    while consumed < budget and any(running):
        for w, slot in enumerate(running):
            if slot is None or consumed >= budget:
                continue
            slot[1] += 1
            consumed += 1
            vec = pool[slot[0]][slot[1] - 1]
            stop = slot[1] == epochs
            if stop:
                done.append(vec)
                curve.append((consumed, hv(done)))
            elif sched is not None:
                result = {"epoch": slot[1], **dict(zip(OBJECTIVES, vec))}
                stop = sched.on_trial_result(None, slot[2], result) == TrialScheduler.STOP
            elif rung == "oracle":
                stop = slot[1] == 1 and useless(pool[slot[0]])
            if stop:
                more = rung is not None or started < budget // epochs
                running[w] = [order.pop(), 0, SimpleNamespace(trial_id=str(started))] if more else None
                started += more
    return curve


def first_reach(curve, target: float, budget: int) -> float:
    """search_efficiency's fraction, a replay that never reaches the target counted as 1.0."""
    f = se.first_reach(curve, target, budget)
    return 1.0 if f is None else f


def build(epochs: int, seeds: list[int], work: Path) -> list[str]:
    import logging
    import os

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    setting = replace(se.DIGITS, key=f"pool{epochs}", epochs=epochs)
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    paths = []
    try:
        for seed in seeds:
            out = work / f"pool{epochs}-s{seed}.json"
            if not out.is_file():
                out.write_text(json.dumps({"run": se.run_sweep(setting, "random", seed, work, WORKERS)}))
            paths.append(str(out))
    finally:
        ray.shutdown()
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", help="glob of search_efficiency run JSONs (random FIFO sweeps of one setting)")
    p.add_argument("--build", type=int, metavar="EPOCHS", help="run random FIFO sweeps of EPOCHS epochs first")
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102, 103, 104])
    p.add_argument("--work-dir", default="/tmp/rung-replay")
    p.add_argument("--replays", type=int, default=200)
    args = p.parse_args(argv)
    if args.build:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        paths = build(args.build, args.seeds, work)
    elif args.pool:
        paths = sorted(glob.glob(args.pool))
    else:
        raise SystemExit("error: give --pool GLOB or --build EPOCHS")
    if not paths:
        raise SystemExit(f"error: no run JSON matches {args.pool!r}")
    pool = load_pool(paths)
    epochs = len(pool[0])
    budget = FULL_TRIALS * epochs
    print(f"pool: {len(pool)} trials of {epochs} epochs from {len(paths)} sweeps; budget {budget} epochs")
    for e in range(epochs):
        sparse = sum(t[e][2] > 0 for t in pool)
        below = sum(not FLOORS.feasible(dict(zip(OBJECTIVES, t[e]))) for t in pool)
        print(f"  after epoch {e + 1}: {sparse:3d} with channel sparsity > 0, {below:3d} below the floor")
    fifo = [replay(pool, budget, random.Random(i), None) for i in range(args.replays)]
    target = statistics.fmean(c[-1][1] for c in fifo)

    def row(method: str, curves: list[list[tuple[int, float]]]) -> dict[str, Any]:
        fr = [first_reach(c, target, budget) for c in curves]
        runs = [statistics.fmean(fr[i:i + SEEDS]) for i in range(0, len(fr) - SEEDS + 1, SEEDS)]
        return {"method": method, "fraction": statistics.fmean(fr), "final_hv": statistics.fmean(c[-1][1] for c in curves),
                "run_sd": statistics.stdev(runs) if len(runs) > 1 else math.nan,
                "runs_met": sum(r <= se.TARGET_FRACTION for r in runs) / len(runs) if runs else math.nan}

    rows = [row("random (FIFO)", fifo),
            row("random + oracle (stops after epoch 1 exactly the trials that end dense or below the floor)",
                [replay(pool, budget, random.Random(i), "oracle") for i in range(args.replays)])]
    for grace in (1, 2, 3):
        for eta in (2, 3, 4):
            if grace >= epochs:
                continue
            for tie in TIE_BREAKS:  # with the floors, as the CLI; no pool vector is below them
                rows.append(row(f"random+moasha grace {grace} eta {eta} {tie}",
                                [replay(pool, budget, random.Random(i), (grace, eta, tie))
                                 for i in range(args.replays)]))
    print(f"\ntarget: random FIFO's mean final hypervolume {target:.4f} ({args.replays} replays each; "
          f"a run = {SEEDS} consecutive replays, as search_efficiency's {SEEDS} seeds)\n")
    print(f"| method | budget fraction to reach the target | final hypervolume | sd of a {SEEDS}-seed run's fraction "
          f"| runs at <= {se.TARGET_FRACTION} |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["fraction"]):
        print(f"| {r['method']} | {r['fraction']:.3f} | {r['final_hv']:.4f} | {r['run_sd']:.3f} | {r['runs_met']:.0%} |")
    best = min(rows[2:], key=lambda r: r["fraction"])
    print(json.dumps({"pool_trials": len(pool), "epochs": epochs, "target_hv": round(target, 5),
                      "useless_trials": sum(map(useless, pool)),
                      "best": best["method"], "best_fraction": round(best["fraction"], 3),
                      "best_runs_met": round(best["runs_met"], 3),
                      "fifo_fraction": round(rows[0]["fraction"], 3),
                      "oracle_fraction": round(rows[1]["fraction"], 3),
                      "oracle_runs_met": round(rows[1]["runs_met"], 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
