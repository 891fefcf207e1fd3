"""`python -m search.evaluate --name NAME`: the strong evaluation of a finished sweep's front.

It loads each chosen trial's deployed (quantized) model from its final Tune checkpoint
(`trial_<id>/checkpoint_*/model.pt`, with the run's config from `state.pt`), evaluates it on the
test split with the strong suite of trainables.robust_eval (AutoAttack-rand, Square, EOT-PGD and
the sanity flags) at the trial's own evaluation eps (its `eval_attack.eps`, the dataset's default
unless the sweep set one), and then

* adds `test_aa_acc` (AutoAttack-rand; with cheaper --aa-* settings `test_apgd_acc` instead),
  `test_square_acc`, `test_eot_pgd_acc`, `test_strong_pgd_acc`, `test_worst_acc` (per point the
  worst of them), `test_strong_clean_acc` (the same images, the same scoring), `test_strong_eps`,
  the `flag_*` columns and `sanity_flags` to trials.parquet and pareto.parquet (and their CSVs);
* logs them as metrics and tags on each trial's MLflow child run (found by its `ray_trial_id` tag
  under the sweep's parent run) and a summary on the parent run;
* prints the front again with them.

Each finished trial is recorded at once in <sweep>/brsearch/strong_eval.json, keyed by the suite's
settings, so an interrupted run resumes where it stopped and a second run evaluates nothing again
and logs nothing twice. A sweep on s3:// or gs:// is read through a local copy of just the files
used (search.storage.SweepLocation) and the changed files are written back to the storage. Cost per model:
docs/training.md, "Strong evaluation".
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from search.storage import SweepLocation
from trainables.cliutil import OneLineParser, fail
from trainables.config import ConfigError
from trainables.contract import (
    CHECKPOINT_FILE,
    CLEAN_ACC,
    COMPLETED,
    FRONT_FILE,
    MODEL_FILE,
    OBJECTIVES,
    RECORD_FILE,
    STATE_DIR,
    STRONG_EVAL_FILE,
    TRIAL_ID,
    TRIALS_FILE,
    trial_dir,
)
from trainables.fileio import atomic_write_text
from trainables.robust_eval import StrongEvalConfig
from trainables.sanity import FLAGS

ACC_COLUMNS = {"test_aa_acc": "aa_acc", "test_apgd_acc": "apgd_acc", "test_square_acc": "square_acc",
               "test_eot_pgd_acc": "eot_pgd_acc", "test_strong_pgd_acc": "pgd_acc", "test_worst_acc": "worst_acc",
               "test_strong_clean_acc": CLEAN_ACC}
NUMBER_COLUMNS = (*ACC_COLUMNS, "test_strong_n", "test_strong_eps")
COLUMNS = (*NUMBER_COLUMNS, *FLAGS, "sanity_flags")
SUITE_FLAGS = {"aa_steps": int, "aa_eot": int, "aa_restarts": int, "square_queries": int,
               "eot_steps": int, "eot_samples": int, "pgd_steps": int, "batch_size": int}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m search.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    d = StrongEvalConfig()
    p.add_argument("--name", required=True, help="the sweep (as given to search.pareto --name)")
    p.add_argument("--storage-path", default="./brsearch_results",
                   help="where the sweep lives, as given to search.pareto (a directory, s3://..., gs://...)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the sweep's, from its sweep.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--trials", help="comma-separated trial ids (default: the Pareto front)")
    g.add_argument("--all", action="store_true", help="every completed trial")
    p.add_argument("--subset-test", type=int, help="evaluate on the first N test images only (quick runs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    for k, t in SUITE_FLAGS.items():
        p.add_argument("--" + k.replace("_", "-"), type=t, help=f"default {getattr(d, k)}")
    p.add_argument("--no-mlflow", action="store_true", help="update the tables only")
    p.add_argument("--quiet", action="store_true")
    return p


@dataclasses.dataclass
class Target:
    """A finished sweep as the strong evaluation reads it: where it is, its record and tables."""

    location: SweepLocation
    sweep: dict[str, Any]
    trials: pd.DataFrame
    front: pd.DataFrame




def locate(args: argparse.Namespace) -> Target:
    location = SweepLocation(args.storage_path, args.name)
    try:
        got = {p.name for p in location.fetch(TRIALS_FILE, FRONT_FILE, f"{STATE_DIR}/{RECORD_FILE}",
                                              f"{STATE_DIR}/{STRONG_EVAL_FILE}")}
    except (OSError, ValueError) as e:  # unreachable storage, bad credentials, unknown bucket or scheme
        raise ConfigError(f"--storage-path {args.storage_path}: cannot read it: {str(e).splitlines()[0]}") from None
    if not {TRIALS_FILE, FRONT_FILE} <= got:
        raise ConfigError(f"--name {args.name}: no finished sweep under {args.storage_path} (no {TRIALS_FILE}); "
                          "accepted: the --name and --storage-path of a sweep that has ended")
    try:
        sweep = json.loads((location.state_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        sweep = {}
    trials = pd.read_parquet(location.local_dir / TRIALS_FILE)
    front = pd.read_parquet(location.local_dir / FRONT_FILE)
    return Target(location, sweep, trials, front)


def choose(t: Target, args: argparse.Namespace) -> list[str]:
    if args.trials:
        ids = [s.strip() for s in args.trials.split(",") if s.strip()]
        known = set(t.trials[TRIAL_ID])
        bad = [i for i in ids if i not in known]
        if bad:
            raise ConfigError(f"--trials: unknown trial {bad[0]!r}; accepted: ids of {args.name}'s trials.parquet")
        return ids
    if args.all:
        return list(t.trials[t.trials["status"] == COMPLETED][TRIAL_ID])
    return list(t.front[TRIAL_ID])


def model_files(location: SweepLocation, trial_id: str) -> tuple[Path, Path]:
    """(model.pt, state.pt) of the trial's final checkpoint: the last one holding a model."""
    ck = location.final_checkpoint(trial_id)
    if ck is None:
        raise FileNotFoundError(f"trial {trial_id}: no checkpoint with {MODEL_FILE} under {location.exp_dir}/{trial_dir(trial_id)}")
    return ck / MODEL_FILE, ck / CHECKPOINT_FILE


def suite_config(args: argparse.Namespace) -> StrongEvalConfig:
    over = {k: getattr(args, k) for k in SUITE_FLAGS if getattr(args, k) is not None}
    for k, v in over.items():
        if v < 1:
            raise ConfigError(f"--{k.replace('_', '-')}={v}; accepted: an integer >= 1")
    if args.subset_test is not None and args.subset_test < 1:
        raise ConfigError(f"--subset-test={args.subset_test}; accepted: an integer >= 1")
    cfg = dataclasses.replace(StrongEvalConfig(), **over)
    cfg.validate()
    return cfg


def settings_key(cfg: StrongEvalConfig, subset_test: int | None) -> str:
    blob = json.dumps({"suite": dataclasses.asdict(cfg), "subset_test": subset_test}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_DATA_CACHE: dict[str, Any] = {}


def evaluate_trial(location: SweepLocation, trial_id: str, suite: StrongEvalConfig, subset_test: int | None,
                   device: str, log) -> dict[str, Any]:
    """Load the trial's deployed model and run the strong suite on its test split."""
    import torch

    from trainables.config import TrainConfig
    from trainables.data import load_data
    from trainables.loop import pick_device
    from trainables.models import build_model
    from trainables.robust_eval import strong_eval

    model_pt, state_pt = model_files(location, trial_id)
    state = torch.load(state_pt, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_flat(state["config"])
    cfg.device = device
    key = json.dumps({k: v for k, v in cfg.to_flat().items()
                      if k in ("dataset", "data_root", "subset_train", "subset_test", "val_fraction", "seed")},
                     sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_data(cfg)
    data = _DATA_CACHE[key]
    dev = pick_device(device)
    model = build_model(cfg.depth, cfg.width, data.in_channels, data.num_classes, cfg.ensemble, cfg.noise)
    model.load_state_dict(torch.load(model_pt, map_location="cpu", weights_only=True))
    model.to(dev)
    x, y = data.test.to_float(dev)
    if subset_test:
        x, y = x[:subset_test], y[:subset_test]
    s = trial_suite(suite, cfg)
    t0 = time.perf_counter()
    res = strong_eval(model, x, y, s)
    res.pop("points")
    res["wall_s"] = time.perf_counter() - t0
    res["device"] = str(dev)
    res["eps"] = s.eps
    aa = "AA-rand" if s.aa_name == "aa" else "APGD (not AA-rand)"
    log(f"trial {trial_id}: clean {res[CLEAN_ACC]:.4f}, {aa} {res.get(s.aa_name + '_acc', float('nan')):.4f}, "
        f"Square {res.get('square_acc', float('nan')):.4f}, EOT-PGD {res.get('eot_pgd_acc', float('nan')):.4f}, "
        f"worst {res['worst_acc']:.4f} at eps {s.eps:.4g} on {len(y)} images in {res['wall_s']:.0f}s; "
        f"flags: {res['sanity_flags'] or 'none'}")
    return res


def trial_suite(suite: StrongEvalConfig, cfg: Any) -> StrongEvalConfig:
    """The suite at the trial's own threat model: its evaluation eps, PGD step and random start
    (resolved from its dataset when the sweep left them unset; the suite's PGD-k is then the
    sweep's own attack, scored the suite's way, which flag_aa compares AutoAttack-rand with) and
    its evaluation seed."""
    cfg.validate()
    return dataclasses.replace(suite, eps=cfg.eval_attack.eps, pgd_step=cfg.eval_attack.step,
                               pgd_random_start=cfg.eval_attack.random_start, seed=cfg.eval_seed)


def row_values(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {col: res.get(key) for col, key in ACC_COLUMNS.items()}
    out["test_strong_n"] = res.get("n_images")
    out["test_strong_eps"] = res.get("eps")
    for f in FLAGS:
        out[f] = res.get(f)
    out["sanity_flags"] = res.get("sanity_flags", "")
    return out


def update_tables(t: Target, results: dict[str, dict[str, Any]]) -> list[Path]:
    """Set the strong columns of every evaluated trial in both tables (columns, not rows: a
    rerun overwrites the same cells)."""
    from search.results import write_tables

    def fill(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        for col in COLUMNS:
            vals = [row_values(results[tid])[col] if tid in results else None for tid in df[TRIAL_ID]]
            df[col] = pd.Series(vals, index=df.index, dtype="object")
        for col in NUMBER_COLUMNS:
            df[col] = pd.to_numeric(df[col], errors="coerce")
        return df

    t.trials, t.front = fill(t.trials), fill(t.front)
    return write_tables(t.location.local_dir, t.trials, t.front)


def log_mlflow(t: Target, tracking_uri: str, results: dict[str, dict[str, Any]], files: list[Path], log) -> int:
    """Metrics and flags on each child run, a summary on the parent (search.tracking's writer);
    returns how many child runs got new metrics."""
    from search.tracking import SweepRun, log_strong_results

    parent, exp = t.sweep.get("parent_run_id"), t.sweep.get("experiment_id")
    if not parent or not exp:
        log(f"no parent run recorded in {RECORD_FILE}: MLflow not updated")
        return 0
    metrics, flags = {}, {}
    for tid, res in results.items():
        vals = row_values(res)
        metrics[tid] = {k: vals[k] for k in NUMBER_COLUMNS if vals[k] is not None}
        flags[tid] = {**{f"sanity.{f}": "n/a" if vals[f] is None else str(bool(vals[f])).lower() for f in FLAGS},
                      "sanity_flags": vals["sanity_flags"] or "none"}
    summary = {"strong_n_evaluated": float(len(results)),
               "strong_n_flagged": float(sum(bool(r.get("sanity_flags")) for r in results.values()))}
    aa = [results[tid]["aa_acc"] for tid in t.front[TRIAL_ID] if tid in results and results[tid].get("aa_acc") is not None]
    if aa:
        summary["front_max_test_aa_acc"] = float(max(aa))
        summary["front_mean_test_aa_acc"] = float(sum(aa) / len(aa))
    logged, missing = log_strong_results(SweepRun(tracking_uri, exp, parent, t.sweep.get("name", "")), metrics, flags,
                                         summary, files)
    for tid in missing:
        log(f"trial {tid}: no MLflow child run under parent {parent}; skipped")
    return logged


def evaluate_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        suite = suite_config(args)
        t = locate(args)
        ids = choose(t, args)
        if args.threads < 0:
            raise ConfigError(f"--threads={args.threads}; accepted: an integer >= 0 (0 = torch's default)")
    except ConfigError as e:
        fail(str(e))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    key = settings_key(suite, args.subset_test)
    store = t.location.state_dir / STRONG_EVAL_FILE
    try:
        saved = json.loads(store.read_text())
    except (OSError, ValueError):
        saved = {}
    results: dict[str, dict[str, Any]] = saved.get(key, {}).get("trials", {})
    todo = [i for i in ids if i not in results]
    log(f"search.evaluate {args.name}: {len(ids)} trial(s), {len(ids) - len(todo)} already evaluated with "
        f"these settings (key {key}), {len(todo)} to go")
    interrupted = False
    try:
        for i, tid in enumerate(todo, 1):
            try:
                res = evaluate_trial(t.location, tid, suite, args.subset_test, args.device, log)
            except FileNotFoundError as e:
                print(f"warning: {e}", file=sys.stderr)
                continue
            res.pop("seconds", None)
            results[tid] = res
            saved[key] = {"settings": {"suite": dataclasses.asdict(suite), "subset_test": args.subset_test},
                          "trials": results}
            t.location.state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(saved, indent=1, default=str) + "\n", store)
            t.location.push([store])  # on s3://, gs://: recorded where a rerun from any machine finds it
            log(f"[{i}/{len(todo)}] recorded {tid}")
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: finished trials are recorded; run the same command again to continue", file=sys.stderr)
    chosen = {tid: results[tid] for tid in ids if tid in results}
    files = update_tables(t, chosen)
    shown = t.location.push(files)
    if not args.no_mlflow:
        uri = args.tracking_uri or t.sweep.get("tracking_uri")
        if not uri or "***" in str(uri):
            print("warning: no usable tracking URI (pass --tracking-uri); MLflow not updated", file=sys.stderr)
        else:
            n = log_mlflow(t, uri, chosen, files, log)
            log(f"MLflow: new metrics on {n} child run(s)")
    from search.results import format_front

    cols = [TRIAL_ID, *OBJECTIVES]
    cols += [c for c in ("test_clean_acc", "test_robust_acc") if c in t.front]
    cols += ["test_strong_clean_acc", "test_aa_acc", "test_apgd_acc", "test_square_acc", "test_eot_pgd_acc",
             "test_worst_acc", "test_strong_eps", "sanity_flags"]
    print(f"\nPareto front of {args.name!r} with the strong evaluation:")
    print(t.front[[c for c in cols if c in t.front]].to_string(index=False, float_format=lambda v: f"{v:.4g}")
          if len(t.front) else format_front(t.front))
    print(f"\nwrote {', '.join(shown)}")
    return 130 if interrupted else 0

