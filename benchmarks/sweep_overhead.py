"""How much of a sweep's wall time is the trials' own work?

Runs `python -m search.pareto` exactly as a user would (a subprocess, local Ray, a fresh sqlite
MLflow store and storage path in a temporary directory) with short trials on the embedded digits
data, then compares the wall time with the ideal: the sum of the trials' own run times
(`time_total_s` in trials.parquet, measured inside each trial) divided by the concurrent slots.

    ratio         = wall (launch to exit of search.pareto) / ideal         target <= 1.10 (trials of ~60 s)
    ratio_steady  = (first trial start .. last trial end) / ideal

`ratio` includes the fixed costs of a sweep (Ray start-up, MLflow store creation, the first trial
actors' start, and the tables/plots/MLflow artifacts at the end); `ratio_steady` excludes them
but still includes what the sweep pays per trial between trials (a fresh actor process per trial:
its start-up and imports; stopping the previous one; scheduling; driver-side logging). Trial start
and end times come from the MLflow child runs, which the driver opens when Tune starts a trial and
closes when it completes.

Each run measures two sweeps one after the other: the CLI's default (later trials run in finished
trials' worker processes) and `--no-reuse-actors` (a fresh worker process per trial, Ray Tune's
default), so the two ratios come from the same machine state.

    python benchmarks/sweep_overhead.py                     # 8 trials x 2 epochs, 2 at once
    python benchmarks/sweep_overhead.py --trials 8 --epochs 10 --subset-train 1000
    python benchmarks/sweep_overhead.py --epochs 55 --subset-train 1500 --subset-test 300 \
        --set width=16                                      # trials of about 60 s (the target's setting)
    python benchmarks/sweep_overhead.py --modes default     # the default sweep only

The last stdout line is a JSON object with the key `ratio` (the default sweep) and, when measured,
`ratio_fresh_actors` and the per-mode figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.10
TINY_SETS = ["depth=8", "width=4", "attack_steps=2", "proxy_eval_size=64", "cw=false", "eval_attack.steps=2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-concurrent", type=int, default=2, help="concurrent trial slots")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--subset-train", type=int, default=300)
    p.add_argument("--subset-test", type=int, default=100)
    p.add_argument("--sampler", default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for search.pareto (after the tiny-model defaults)")
    p.add_argument("--modes", default="default,fresh",
                   help="comma-separated: default (the CLI as is) and/or fresh (--no-reuse-actors)")
    p.add_argument("--keep", action="store_true", help="keep the temporary sweep directory")
    p.add_argument("--verbose", action="store_true", help="show search.pareto's output")
    return p.parse_args(argv)


def run_sweep(args: argparse.Namespace, tmp: Path, mode: str = "default") -> dict:
    name = f"overhead-{mode}"
    cmd = [sys.executable, "-m", "search.pareto", "--name", name, "--trials", str(args.trials),
           "--epochs", str(args.epochs), "--max-concurrent", str(args.max_concurrent),
           "--num-cpus", str(args.num_cpus), "--sampler", args.sampler, "--seed", str(args.seed),
           "--subset-train", str(args.subset_train), "--subset-test", str(args.subset_test),
           "--storage-path", str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp / f'mlflow-{mode}.db'}",
           "--quiet"]
    if mode == "fresh":
        cmd.append("--no-reuse-actors")
    for s in [*TINY_SETS, *args.set]:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    load_before = os.getloadavg()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    t1 = time.time()
    if args.verbose or proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    if proc.returncode != 0:
        raise SystemExit(f"search.pareto exited {proc.returncode}")
    return {"name": name, "mode": mode, "db": tmp / f"mlflow-{mode}.db", "t_launch": t0, "t_exit": t1,
            "stderr": proc.stderr, "stdout": proc.stdout, "load_before": load_before, "load_after": os.getloadavg()}


def measure(args: argparse.Namespace, tmp: Path, run: dict) -> dict:
    import pandas as pd
    from mlflow.tracking import MlflowClient

    exp = tmp / "results" / run["name"]
    trials = pd.read_parquet(exp / "trials.parquet")
    done = trials[trials["status"] == "completed"]
    if len(done) != args.trials:
        raise SystemExit(f"{len(done)} of {args.trials} trials completed:\n{trials[['trial_id', 'status', 'reason']]}")
    client = MlflowClient(f"sqlite:///{run['db']}")
    exp_id = client.get_experiment_by_name("brsearch").experiment_id
    runs = client.search_runs([exp_id], max_results=10000)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)  # one sweep per store
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    starts = [r.info.start_time / 1000 for r in children]
    ends = [r.info.end_time / 1000 for r in children]

    slots = min(args.max_concurrent, args.num_cpus, args.trials)
    busy = float(done["time_total_s"].sum())  # the trials' own run time
    ideal = busy / slots
    wall = run["t_exit"] - run["t_launch"]
    steady = max(ends) - min(starts)
    seen = sum(e - s for s, e in zip(starts, ends))  # as the driver saw each trial run
    return {
        "ratio": wall / ideal,
        "ratio_steady": steady / ideal,
        "wall_s": wall,
        "ideal_s": ideal,
        "steady_s": steady,
        "trials": int(len(done)),
        "slots": slots,
        "epochs": args.epochs,
        "trial_time_sum_s": busy,
        "trial_time_mean_s": busy / len(done),
        # fixed costs: launch -> the first trial runs (Python imports, input checks, Ray start-up,
        # MLflow store + parent run, Optuna study, the first actors' start) and last trial end ->
        # exit (results tables, plots, MLflow artifacts, Ray shutdown)
        "startup_s": min(starts) - run["t_launch"],
        "teardown_s": run["t_exit"] - max(ends),
        # per trial, between trials: slot time in the steady window not spent inside a trial
        # (actor process start + imports, stopping the previous actor, scheduling)
        "gap_per_trial_s": (steady * slots - seen) / len(done),
        # per trial, inside: driver-seen duration minus the trial's own time (result/checkpoint
        # round trips, driver-side callbacks)
        "report_overhead_per_trial_s": (seen - busy) / len(done),
        "parent_run_s": (parent.info.end_time - parent.info.start_time) / 1000,
        "snapshot_warnings": run["stderr"].count("Experiment state snapshotting has been triggered"),
        "load_avg_before": round(run["load_before"][0], 2),
        "load_avg_after": round(run["load_after"][0], 2),
        "cpus": os.cpu_count(),
    }


def table(m: dict) -> str:
    rows = [
        ("trials x epochs", f"{m['trials']} x {m['epochs']}  ({m['slots']} at once)"),
        ("wall time, launch to exit", f"{m['wall_s']:.1f} s"),
        ("  start-up (to first trial start)", f"{m['startup_s']:.1f} s"),
        ("  steady (first start to last end)", f"{m['steady_s']:.1f} s"),
        ("  teardown (last end to exit)", f"{m['teardown_s']:.1f} s"),
        ("sum of trial run times", f"{m['trial_time_sum_s']:.1f} s  (mean {m['trial_time_mean_s']:.2f} s)"),
        ("ideal = sum / slots", f"{m['ideal_s']:.1f} s"),
        ("gap between trials, per trial", f"{m['gap_per_trial_s']:.2f} s"),
        ("report overhead, per trial", f"{m['report_overhead_per_trial_s']:.2f} s"),
        ("snapshot warnings", str(m["snapshot_warnings"])),
        ("load average before/after", f"{m['load_avg_before']} / {m['load_avg_after']} on {m['cpus']} CPUs"),
        ("ratio = wall / ideal", f"{m['ratio']:.2f}  (target <= {TARGET}: {'met' if m['ratio'] <= TARGET else 'missed'})"),
        ("ratio_steady = steady / ideal", f"{m['ratio_steady']:.2f}"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"default", "fresh"}:
        raise SystemExit(f"--modes {args.modes!r}; accepted: default, fresh or both, comma-separated")
    tmp = Path(tempfile.mkdtemp(prefix="brsearch-overhead-"))
    results: dict[str, dict] = {}
    try:
        for mode in modes:
            results[mode] = measure(args, tmp, run_sweep(args, tmp, mode))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for mode, m in results.items():
        print(f"--- {mode}: {'--no-reuse-actors (a fresh worker per trial)' if mode == 'fresh' else 'the CLI as is (workers reused)'}")
        print(table(m))
    out: dict = dict(results[modes[0]])
    out["mode"] = modes[0]
    if "default" in results:
        out["ratio"] = results["default"]["ratio"]
    if "fresh" in results:
        out["ratio_fresh_actors"] = results["fresh"]["ratio"]
        out["ratio_steady_fresh_actors"] = results["fresh"]["ratio_steady"]
    if len(results) > 1:
        out["modes"] = results

    def rounded(v):
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return round(v, 4) if isinstance(v, float) else v

    print(json.dumps(rounded(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
