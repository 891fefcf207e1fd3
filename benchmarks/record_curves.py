"""Record learning curves: every epoch's validation objectives and time, for N random configs.

    python benchmarks/record_curves.py                      # digits space, 400 configs x 27 epochs
    python benchmarks/record_curves.py --configs 32 --set attack_steps=2 cw=false eval_draws=2 \\
        --out benchmarks/data/curves_digits_pilot.parquet   # the committed pilot (cheaper trials)
    python benchmarks/record_curves.py --space paper --set dataset=cifar10 device=cuda \\
        --workers 8 --out curves_cifar10.parquet            # the same table on a GPU machine

The trainable is the sweep's own training loop (`trainables.loop.train`), run in plain worker
processes (no Ray, no Optuna in the workers), with every epoch's report kept: one row per
(config, epoch) with the three objectives (per-epoch proxies; the last epoch's row holds the
final evaluation, as the sweep's last report does), `epoch_time_s` (training and the proxy
evaluation), `report_s` (wall time since the previous report: the final evaluation included) and
the sampled config as columns (`p_<name>`: Optuna's parameter values, what a sampler proposes). `benchmarks/replay.py` replays schedulers and samplers over it.

Configs are drawn by Optuna's RandomSampler over the space's own `suggest` (seeded: config k is
the same in every run), so the table is resumable: a config whose rows are complete is skipped and
the table is rewritten after each config, so an interrupted recording keeps what it finished.
A config that diverges keeps its rows up to the divergence with `diverged` set on the last.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainables.contract import CHANNEL_SPARSITY, CLEAN_ACC, EPOCH, OBJECTIVES, ROBUST_ACC, training_config  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "data" / "curves_digits.parquet"
CONFIG_ID, CONFIG_HASH, DIVERGED_COL = "config_id", "config_hash", "diverged"
PARAM_PREFIX = "p_"  # config columns: p_<name> (sampled), so they never clash with result columns


def draw_configs(space: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """The first n configs of the seeded random draw (sampled values and the switches)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed),
                                directions=["maximize"] * len(OBJECTIVES))
    out = []
    for _ in range(n):
        trial = study.ask()
        space.suggest(trial)
        out.append(dict(trial.params))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return out


def config_hash(params: dict[str, Any], fixed: dict[str, Any], epochs: int) -> str:
    body = json.dumps({"params": params, "fixed": fixed, "epochs": epochs}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def run_config(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One config trained for its epochs in this process; its rows."""
    import torch

    from trainables.config import TrainConfig
    from trainables.loop import DivergedError, Hooks, train

    torch.set_num_threads(job["threads"])
    cfg = TrainConfig.from_flat(training_config({**job["train"], "epochs": job["epochs"]}))
    rows: list[dict[str, Any]] = []
    last = [time.perf_counter()]

    class Keep(Hooks):
        def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any], final: bool) -> None:
            now = time.perf_counter()
            rows.append({EPOCH: int(metrics[EPOCH]), **{k: float(metrics[k]) for k in OBJECTIVES},
                         "epoch_time_s": float(metrics["epoch_time_s"]), "report_s": now - last[0],
                         "final": bool(final), DIVERGED_COL: False})
            last[0] = now

    try:
        train(cfg, Keep())
    except DivergedError:
        if rows:
            rows[-1][DIVERGED_COL] = True
        else:
            rows.append({EPOCH: 0, **{k: float("nan") for k in OBJECTIVES}, "epoch_time_s": 0.0,
                         "report_s": time.perf_counter() - last[0], "final": False, DIVERGED_COL: True})
    params = {PARAM_PREFIX + k: v for k, v in job["params"].items()}
    return [{CONFIG_ID: job["config_id"], CONFIG_HASH: job["hash"], "max_epochs": job["epochs"], **r, **params}
            for r in rows]


def _sampled_values(space: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The training values Optuna's params stand for (zero_below, switches): the space's suggest,
    replayed on a fixed trial."""
    import optuna

    return space.suggest(optuna.trial.FixedTrial(params))


def complete_ids(path: Path, epochs: int) -> set[str]:
    """Config hashes already recorded in full (all epochs, or up to a divergence)."""
    if not path.exists():
        return set()
    import pandas as pd

    df = pd.read_parquet(path)
    done = set()
    for h, g in df.groupby(CONFIG_HASH):
        if g[DIVERGED_COL].any() or g[EPOCH].max() >= epochs:
            done.add(h)
    return done


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows).sort_values([CONFIG_ID, EPOCH], kind="stable")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)  # an interrupt never leaves a half-written table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="digits")
    p.add_argument("--epochs", type=int, default=27)
    p.add_argument("--configs", type=int, default=400)
    p.add_argument("--seed", type=int, default=0, help="the config draw's seed (config k is the same for every run)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pinned training values, as search.pareto's --set")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="configs trained at once (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    from search.optimizer import load_space, parse_sets
    from trainables.config import ConfigError

    for name, v in (("--epochs", a.epochs), ("--configs", a.configs), ("--workers", a.workers), ("--threads", a.threads)):
        if v < 1:
            print(f"error: {name} {v}; accepted: an integer >= 1", file=sys.stderr)
            return 2
    try:
        space = load_space(a.space).pin(parse_sets(a.set))
        space.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fixed = {k: v for k, v in space.fixed.items() if k != "epochs"}
    drawn = draw_configs(space, a.configs, a.seed)
    done = complete_ids(a.out, a.epochs)
    import pandas as pd

    rows = pd.read_parquet(a.out).to_dict("records") if a.out.exists() else []
    rows = [r for r in rows if r[CONFIG_HASH] in done]  # a config cut off mid-way is run again
    jobs = []
    for k, params in enumerate(drawn):
        h = config_hash(params, fixed, a.epochs)
        if h in done:
            continue
        jobs.append({"config_id": k, "hash": h, "params": params, "train": _sampled_values(space, params),
                     "epochs": a.epochs, "threads": a.threads})
    print(f"record_curves: {len(drawn) - len(jobs)} of {len(drawn)} configs recorded, {len(jobs)} to run "
          f"({a.workers} at once, {a.epochs} epochs) -> {a.out}", flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as pool:
        futures = {pool.submit(run_config, j): j for j in jobs}
        for i, fut in enumerate(as_completed(futures), 1):
            new = fut.result()
            rows.extend(new)
            write(a.out, rows)
            last = new[-1]
            print(f"  [{i}/{len(jobs)}] config {futures[fut]['config_id']}: {last[EPOCH]} epochs, "
                  f"clean {last[CLEAN_ACC]:.3f} robust {last[ROBUST_ACC]:.3f} sparsity {last[CHANNEL_SPARSITY]:.3f}, "
                  f"{sum(r['report_s'] for r in new):.0f} s ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
