"""Does the driver scale to 1,000 trials?

Runs sweeps of a synthetic trainable (no torch: it sleeps a little per epoch and reports all
three objectives, plausible values that depend on the config, for a few epochs) through the real
driver stack of `python -m search.pareto`: its Plan and `build_tuner` (the default sampler in
ParetoSearch, MO-ASHA), the MLflow callback on a sqlite store, the progress and divergence
callbacks, and the results bookkeeping at the end (trials/pareto tables, the parent run), on
local Ray with many logical CPUs. Trial processes are reused (`--reuse-actors`): 1,000 process
starts would measure Ray's worker start-up on this 2-core machine, not the driver.

    driver_ms_per_result = CPU time of the driver loop's thread during the sweep and its
                           bookkeeping (Tune's controller, the searcher and sampler, MO-ASHA, the
                           callbacks and whatever MLflow calls they make synchronously, the tables
                           and parent run at the end), plus the wall time the loop waited for a
                           trial sampled ahead that was still in flight (search.optimizer.ParetoSearch),
                           / reported results. The trainables run in other processes, so their
                           sleep is not in it; neither is work moved to background threads (Ray's
                           own, asynchronous logging, sampling ahead) while the loop does not
                           wait on it. The whole driver process's CPU is reported beside it.
    growth               = driver_ms_per_result at --trials / at --small      targets: <= 20 ms, <= 2x

    nice -n 10 python benchmarks/driver_scale.py                  # 100 then 1,000 trials
    nice -n 10 python benchmarks/driver_scale.py --checkpoints    # a checkpoint per result, as trainables.tune
    python benchmarks/driver_scale.py --trials 200 --small 50     # quicker look
    python benchmarks/driver_scale.py --trials 100 --small 10 --profile 60   # the loop's CPU by function

The last stdout line is JSON: trials, driver_ms_per_result, growth, and per-size details.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import math
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_MS, TARGET_GROWTH = 20.0, 2.0


def synthetic_trainable(config: dict[str, Any]) -> None:
    """Reports like trainables.tune: every objective each epoch, `final` at the last one."""
    import random

    from ray import tune

    epochs = int(config.get("epochs", 3))
    rng = random.Random(hash(tuple(sorted((k, str(v)) for k, v in config.items()))))
    skill = rng.random()
    lr = float(config.get("lr", 0.05))
    bits = float(config.get("bits", 2))
    for epoch in range(1, epochs + 1):
        time.sleep(float(os.environ.get("BRSEARCH_SYNTHETIC_SLEEP", "0.02")))
        frac = epoch / epochs
        clean = min(0.99, 0.3 + 0.6 * skill * frac + 0.05 * math.log10(lr / 0.02) + 0.02 * bits)
        robust = max(0.0, clean * (0.3 + 0.4 * rng.random()) * frac)
        sparsity = min(0.95, float(config.get("group_lasso", 0.0)) * 3 * frac + 0.1 * rng.random())
        metrics = {"clean_acc": clean, "robust_acc": robust, "channel_sparsity": sparsity,
                   "val_clean_acc": clean, "val_robust_acc": robust, "weight_sparsity": sparsity,
                   "epoch": epoch, "max_epochs": epochs, "final": epoch == epochs, "node_id": "synthetic"}
        if os.environ.get("BRSEARCH_SYNTHETIC_CHECKPOINTS") == "1":  # as trainables.tune: one per epoch
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                Path(d, "state.json").write_text(json.dumps({"epoch": epoch}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)


def cpu_s() -> float:
    """The driver process's CPU time (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loop_s() -> float:
    """CPU time of this thread: `tuner.fit()` runs Tune's controller loop in the calling thread."""
    return time.thread_time()


def run_sweep(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from search.driver import (
        Flags,
        NoRetryOnDivergence,
        NoTensorBoard,
        ProgressCallback,
        Resources,
        TunerOptions,
        build_tuner,
        prepare,
    )
    from search.optimizer import AHEAD_STATS, settle_sampled_ahead
    from search.results import front_frame, trials_frame, write_tables
    from search.tracking import (
        MLflowSweepCallback,
        SweepEnd,
        SweepRun,
        finish_logging,
        get_or_create_experiment,
        start_parent_run,
    )

    d = tmp / f"n{n}"
    cli = ["--name", f"scale{n}", "--trials", str(n), "--epochs", str(args.epochs), "--scheduler", "moasha",
           "--storage-path", str(d / "results"), "--tracking-uri", f"sqlite:///{d / 'mlflow.db'}",
           "--max-concurrent", str(args.concurrent), "--quiet"]
    plan = prepare(Flags.parse(cli))
    plan.location.state_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(8):  # Ray gives its raylet 30 s to register: too little on a loaded 2-core machine
        try:
            ray.init(address="local", num_cpus=args.concurrent, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001 - "The current node timed out during startup"
            ray.shutdown()
            if attempt == 7 or "timed out during startup" not in str(e):
                raise
            print(f"ray.init: {e}; again", file=sys.stderr, flush=True)
    try:
        client = MlflowClient(plan.tracking_uri)
        exp_id = get_or_create_experiment(client, "brsearch", plan.tracking_uri)
        parent = start_parent_run(client, exp_id, plan.name, {"trials": n}, {})
        sweep_run = SweepRun(plan.tracking_uri, exp_id, parent, plan.name)
        callbacks = [MLflowSweepCallback(sweep_run, floors=plan.floors),
                     ProgressCallback(n), NoRetryOnDivergence(), NoTensorBoard()]
        resources = Resources(1.0, 0.0, args.concurrent, "benchmark")
        tuner = build_tuner(plan, resources, callbacks, TunerOptions(
            reuse_actors=True, trainable=tune.with_resources(synthetic_trainable, {"cpu": 1}),
            keep_checkpoints=args.keep_checkpoints or None))
        prof = cProfile.Profile(time.thread_time) if args.profile else None  # CPU of the loop thread
        c0, l0, w0 = cpu_s(), loop_s(), time.perf_counter()
        a0 = dict(AHEAD_STATS)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # 1,000 progress lines
            if prof:
                prof.enable()
            tuner.fit()
            settle_sampled_ahead()
            l_fit, w_fit = loop_s(), time.perf_counter()
            analysis = tune.ExperimentAnalysis(plan.location.exp_dir)  # what search.driver.end_sweep does after fit
            df = trials_frame(analysis.trials, plan.floors)
            front = front_frame(df)
            files = write_tables(plan.location.local_dir, df, front)
            end = SweepEnd(analysis, df, front, files, "FINISHED", plan.floors, 1.0, 0.0)
            unsent = finish_logging(sweep_run, end, patience_s=600.0, replay_first=False, resume_hint="")
            if prof:
                prof.disable()
        cpu, loop, wall, books = cpu_s() - c0, loop_s() - l0, time.perf_counter() - w0, loop_s() - l_fit
        waited = AHEAD_STATS["waited_s"] - a0["waited_s"]  # the loop held up by a sample still in flight
        loop += waited
        end_wall = time.perf_counter() - w_fit
    finally:
        ray.shutdown()
    results = sum(len(f.read_text().splitlines()) for f in plan.location.local_dir.glob("trial_*/result.json"))
    kept = sum(1 for _ in plan.location.local_dir.glob("trial_*/checkpoint_*"))  # what pruning left on disk
    out = {"trials": n, "results": results, "driver_loop_cpu_s": round(loop, 2), "bookkeeping_cpu_s": round(books, 2),
           "driver_process_cpu_s": round(cpu, 2), "wall_s": round(wall, 1), "end_wall_s": round(end_wall, 1),
           "driver_ms_per_result": round(1000 * loop / max(1, results), 2),
           "process_ms_per_result": round(1000 * cpu / max(1, results), 2),
           "completed": int((df["status"] == "completed").sum()), "stopped": int((df["status"] == "stopped").sum()),
           "mlflow_unsent": bool(unsent), "sampled_ahead": AHEAD_STATS["used"] - a0["used"],
           "ahead_wait_s": round(waited, 2), "checkpoints_left": kept}
    print(json.dumps(out), flush=True)
    if prof:  # where the loop thread's CPU goes (waits not included)
        prof.dump_stats(str(tmp.parent / f"driver-scale-n{n}.pstats"))
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--concurrent", type=int, default=16, help="logical CPUs of the local Ray = trials at once")
    p.add_argument("--sleep", type=float, default=0.02, help="the synthetic trainable's sleep per epoch (s)")
    p.add_argument("--checkpoints", action="store_true",
                   help="the synthetic trainable reports a (tiny) checkpoint with every result, as trainables.tune does")
    p.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                   help="checkpoints kept per trial (the sweep's 2, pruned by search.storage.CheckpointKeeper; "
                        "0 = all)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions of the loop")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["BRSEARCH_SYNTHETIC_SLEEP"] = str(args.sleep)  # read by the trial processes
    os.environ["BRSEARCH_SYNTHETIC_CHECKPOINTS"] = "1" if args.checkpoints else "0"
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # the raylet gives Ray's dashboard agent a few seconds to start, and dies when it is late: it
    # often is on a loaded 2-core machine under nice (read by the raylet from its environment)
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    tmp = Path(tempfile.mkdtemp(prefix="driver-scale-"))
    # imports the bookkeeping needs (pandas, pyarrow, matplotlib...) happen once per process: done
    # here, so that neither size pays them (they would flatter the growth, paid by the first only)
    import matplotlib.pyplot  # noqa: F401

    import search.driver._run  # noqa: F401
    import search.results._tables  # noqa: F401
    import search.tracking._parent  # noqa: F401
    t0 = time.perf_counter()
    try:
        small = run_sweep(args.small, args, tmp)
        big = run_sweep(args.trials, args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    growth = big["driver_ms_per_result"] / max(1e-9, small["driver_ms_per_result"])
    summary = {"trials": args.trials, "checkpoints": args.checkpoints, "keep_checkpoints": args.keep_checkpoints, "driver_ms_per_result": big["driver_ms_per_result"], "growth": round(growth, 2),
               "target_ms": TARGET_MS, "target_growth": TARGET_GROWTH,
               "met": big["driver_ms_per_result"] <= TARGET_MS and growth <= TARGET_GROWTH,
               "total_wall_s": round(time.perf_counter() - t0, 1), "small": small, "big": big}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
