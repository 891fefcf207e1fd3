"""`python -m search.pick`: from a finished sweep's front to one deployable, checked, registered model.

    python -m search.pick --name SWEEP (--knee | [--where CONDS] --maximize M | --minimize M)
                          --out DIR [--register MODEL [--alias A]] [--storage-path P]
    python -m search.pick --compare SWEEP,SWEEP[,...] --out DIR [--storage-path P]

The rule (search.posthoc._rule, docs/pick.md) chooses among the front trials of trials.parquet on
their validation metrics only. The command prints the chosen trial with bootstrap 95 % intervals of
its validation accuracies and the front trials it cannot be told apart from; writes
DIR/<SWEEP>-<TRIAL>.brpk (no provenance in the header, so its length is the trial's `size_kib`
exactly: checked) and DIR/<SWEEP>-<TRIAL>.onnx (search.export's writer and checks: QDQ weights, the
test-time noise as ONNX random ops); re-checks the ONNX model's test accuracy in onnxruntime
against the PyTorch model on the trial's own test images, in the same batches, with the same
scoring (expected correctness over `--draws` noise draws each: onnxruntime's random ops cannot
replay PyTorch's draws, so the two are independent Monte Carlo estimates of one expectation, and
their standard error is reported; with the noise off both must agree image for image); writes
DIR/pick.json; with --register MODEL logs the ONNX model (the packed file beside it) as an MLflow
logged model under the trial's run and registers it as one version of MODEL with its lineage
tags and an alias. A second identical call finds that version by its `brsearch.pick_key` tag and
adds none. Bad input (an unknown sweep or metric, a rule no front trial meets): one line, exit 2,
nothing written or registered; a failed check: one line, exit 1, the exported files removed.

--compare writes DIR/compare.html: the fronts of several sweeps in one interactive plot.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search.storage import SweepLocation
from trainables.cliutil import OneLineParser, fail
from trainables.config import ConfigError
from trainables.contract import (
    CHECKPOINT_FILE,
    COMPLETED,
    DIRECTIONS,
    OBJECTIVES,
    RECORD_FILE,
    SIZE_KIB,
    STATE_DIR,
    TRIAL_ID,
    TRIALS_FILE,
)
from trainables.fileio import atomic_write_text, unwritable

from ._rule import ACCURACIES, Rule, RuleError, accuracy_intervals, choose, indistinguishable, parse_rule

PICK_FILE = "pick.json"
COMPARE_FILE = "compare.html"
TOLERANCE = 0.005  #: the largest |torch - onnxruntime| test accuracy accepted (0.5 percentage points)
MAX_DRAWS = 6400  #: the most noise draws per test image and side (onnx_recheck)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m search.pick", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="the sweep (--name of search.pareto)")
    p.add_argument("--compare", help="instead of a pick: SWEEP,SWEEP,... whose fronts to plot together")
    p.add_argument("--storage-path", default="./brsearch_results", help="where the sweeps live, as given to search.pareto")
    p.add_argument("--knee", action="store_true", help="the front's knee (docs/pick.md)")
    p.add_argument("--where", help='conditions on validation metrics, e.g. "robust_acc>=0.6,size_kib<=16"')
    p.add_argument("--maximize", metavar="METRIC", help="among the front trials meeting --where, the highest METRIC")
    p.add_argument("--minimize", metavar="METRIC", help="among the front trials meeting --where, the lowest METRIC")
    p.add_argument("--out", required=True, help="directory for the packed file, the ONNX model and pick.json")
    p.add_argument("--draws", type=int, default=100,
                   help="noise draws per test image, each side, at first (default 100; doubled while the "
                        "Monte Carlo standard error of the difference is above 0.125 pp)")
    p.add_argument("--register", metavar="MODEL", help="register the pick as a version of this MLflow registered model")
    p.add_argument("--alias", default="picked", help="the registry alias set on the version (default: picked)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the sweep's, from its sweep.json)")
    return p


@dataclass
class Sweep:
    """A finished sweep as a pick reads it."""

    name: str
    location: SweepLocation
    record: dict[str, Any]
    trials: pd.DataFrame

    @property
    def objectives(self) -> tuple[str, ...]:
        """The sweep's objectives as its record names them (a sweep recorded before objectives were a
        choice optimised the default three)."""
        names = self.record.get("objectives") or OBJECTIVES
        if isinstance(names, str):
            names = [n.strip().partition(":")[0] for n in names.split(",") if n.strip()]
        return tuple(names)

    @property
    def front(self) -> pd.DataFrame:
        t = self.trials
        return t[t["pareto"].astype(bool) & (t["status"] == COMPLETED)].reset_index(drop=True)


def open_sweep(storage: str, name: str) -> Sweep:
    """The sweep's record and trials table; RuleError (one line) for no such finished sweep."""
    location = SweepLocation(storage, name)
    try:
        got = {p.name for p in location.fetch(TRIALS_FILE, f"{STATE_DIR}/{RECORD_FILE}")}
    except (OSError, ValueError) as e:
        raise RuleError(f"--storage-path {storage}: cannot read it: {str(e).splitlines()[0]}") from None
    if TRIALS_FILE not in got:
        parent = location.local_dir.parent
        known = sorted(p.name for p in parent.glob("*/") if (p / TRIALS_FILE).is_file()) \
            if not location.remote and parent.is_dir() else []
        raise RuleError(f"--name {name}: no finished sweep of that name under {storage} (no {TRIALS_FILE}); accepted: "
                        f"{', '.join(known) if known else 'the --name and --storage-path of a sweep that has ended'}")
    try:
        record = json.loads((location.state_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        record = {}
    return Sweep(name, location, record, pd.read_parquet(location.local_dir / TRIALS_FILE))


def checkpoint_metrics(sweep: Sweep, trial_id: str) -> dict[str, Any]:
    """What the trial's final report held (its final checkpoint's state.pt `metrics`)."""
    import torch

    ck = sweep.location.final_checkpoint(trial_id)
    if ck is None:
        return {}
    state = torch.load(ck / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    return dict(state.get("metrics") or {}) if isinstance(state, dict) else {}


def with_metrics(sweep: Sweep, front: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The front with every metric the rule and the objectives need; a column trials.parquet lacks
    (a table written before the metric was a column) comes from each trial's final report."""
    missing = [m for m in metrics if m not in front or front[m].isna().any()]
    if not missing or not len(front):
        return front
    front = front.copy()
    reports = {tid: checkpoint_metrics(sweep, tid) for tid in front[TRIAL_ID]}
    for m in missing:
        vals = [front.at[i, m] if m in front and pd.notna(front.at[i, m]) else reports[tid].get(m)
                for i, tid in zip(front.index, front[TRIAL_ID])]
        if any(v is None for v in vals):
            lacking = [tid for tid, v in zip(front[TRIAL_ID], vals) if v is None]
            raise RuleError(f"{m}: front trial(s) {', '.join(lacking[:3])} of {sweep.name} did not report it "
                            f"(e.g. latency_ms where onnxruntime was not installed); accepted: a metric every front "
                            f"trial reported")
        front[m] = pd.to_numeric(pd.Series(vals, index=front.index), errors="coerce")
    return front


# --- the test-split re-check ----------------------------------------------------------------------
def onnx_recheck(model: Any, header: dict[str, Any], onnx_path: Path, x: Any, y: Any, *, draws: int, batch: int,
                    seed: int, max_draws: int = MAX_DRAWS) -> dict[str, float]:
    """Test accuracy of the PyTorch model and of its ONNX file in onnxruntime on the same images, in
    the same batches (the noise is scaled by each batch's std), each scored as the sweep scores:
    per image, the share of the noise draws that classify it right, averaged over the images.

    The two are independent Monte Carlo estimates of one expectation. `draws` per image and side
    are taken first; while the standard error of their difference is above TOLERANCE / 4 (a few
    hundred test images or fewer), the draws are doubled, up to `max_draws`, so that a sound
    export is not failed by sampling noise (at TOLERANCE / 4 that happens once in 15,000). The
    number of draws depends on the standard error only, never on the difference itself.
    Also with the noise off on both sides, where the two must agree image for image."""
    import onnxruntime as ort
    import torch

    from trainables import onnx_export as ox
    from trainables.export import noise
    from trainables.metrics import expected_correct

    model = model.eval()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(ox.onnx_bytes(model, x[:1], noise=False, qdq=ox.weight_codes(model, header)), opts,
                                 providers=["CPUExecutionProvider"])
    n = len(y)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    t_sum, o_sum = np.zeros(n), np.zeros(n)
    done, add, se = 0, draws, float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while add:
            for i, (xb, yb) in zip(range(0, n, batch), batches):
                t_sum[i:i + len(yb)] += expected_correct(model, xb, yb, add).double().numpy() * add
                feed = {ox.INPUT: xb.numpy()}
                o_sum[i:i + len(yb)] += np.sum([sess.run([ox.OUTPUT], feed)[0].argmax(1) == yb.numpy()
                                                for _ in range(add)], axis=0)
            done += add
            # Var(mean difference) = sum_i 2 p_i (1 - p_i) / draws / n^2, p_i from both sides' draws
            p = (t_sum + o_sum) / (2 * done)
            se = float(math.sqrt(float(np.sum(2 * p * (1 - p) / done))) / n) if n else float("nan")
            add = min(done, max_draws - done) if se > TOLERANCE / 4 else 0
        t_off, o_off = np.zeros(n), np.zeros(n)
        with torch.no_grad(), noise(model, False):
            for i, (xb, yb) in zip(range(0, n, batch), batches):
                t_off[i:i + len(yb)] = (model(xb).argmax(1) == yb).double().numpy()
                o_off[i:i + len(yb)] = plain.run([ox.OUTPUT], {ox.INPUT: xb.numpy()})[0].argmax(1) == yb.numpy()
    return {"torch_test_clean_acc": float(t_sum.mean() / done), "onnx_test_clean_acc": float(o_sum.mean() / done),
            "test_diff_se": se, "torch_test_clean_acc_noise_off": float(t_off.mean()),
            "onnx_test_clean_acc_noise_off": float(o_off.mean()),
            "noise_off_disagreements": int((t_off != o_off).sum()), "test_n": n, "test_draws": done}


# --- the command ----------------------------------------------------------------------------------
def _git_sha() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def validate(args: argparse.Namespace) -> tuple[Rule | None, Path]:
    out = Path(os.path.abspath(Path(args.out).expanduser()))
    why = unwritable(out)
    if why:
        raise RuleError(f"--out {args.out}: not writable: {why}; accepted: a writable directory")
    if args.compare:
        if args.name or args.knee or args.where or args.maximize or args.minimize or args.register:
            raise RuleError("--compare plots fronts only; accepted: --compare SWEEP,SWEEP --out DIR [--storage-path P]")
        return None, out
    if not args.name:
        raise RuleError("give --name SWEEP and a rule (--knee, or --maximize/--minimize METRIC), or --compare SWEEP,SWEEP")
    rule = parse_rule(args.knee, args.where, args.maximize, args.minimize)
    if args.draws < 1:
        raise RuleError(f"--draws {args.draws}; accepted: an integer >= 1")
    if args.register is not None:
        if not NAME_RE.match(args.register):
            raise RuleError(f"--register {args.register!r}; accepted: letters, digits, '_', '-', '.'")
        if not ALIAS_RE.match(args.alias) or args.alias == "latest" or re.match(r"^[vV]\d+$", args.alias):
            raise RuleError(f"--alias {args.alias!r}; accepted: letters, digits, '_', '-' (not 'latest' or v<N>)")
    from trainables.onnx_export import available

    missing = available()
    if missing:
        raise RuleError(f"search.pick writes an ONNX model: {missing}")
    return rule, out


def pick_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rule, out = validate(args)
        if rule is None:
            return compare(args, out)
        sweep = open_sweep(args.storage_path, args.name)
        objectives = sweep.objectives
        front = sweep.front
        if not len(front):
            raise RuleError(f"--name {args.name}: the front is empty (no feasible completed trial); nothing to pick")
        front = with_metrics(sweep, front, list(dict.fromkeys([*objectives, *rule.metrics_needed])))
        try:  # the packed file is checked against it; a sweep from before trials reported it has none
            front = with_metrics(sweep, front, [SIZE_KIB])
        except RuleError:
            pass
        chosen, meeting = choose(front, rule, objectives)
        tracking_uri = args.tracking_uri or sweep.record.get("tracking_uri")
        if args.register and (not tracking_uri or "***" in str(tracking_uri)):
            raise RuleError("--register: no usable tracking URI in the sweep's record; accepted: --tracking-uri URI")
    except RuleError as e:
        fail(str(e))
    return _ship(args, out, rule, sweep, front, chosen, meeting, tracking_uri)


def _ship(args: argparse.Namespace, out: Path, rule: Rule, sweep: Sweep, front: pd.DataFrame, chosen: int,
          meeting: list[str], tracking_uri: str | None) -> int:
    from trainables import export as ex
    from trainables.data import load_data

    from ._export import BadInput, check_failed, locate, write_files

    row = front.iloc[chosen]
    tid = str(row[TRIAL_ID])
    ns = argparse.Namespace(run=None, name=sweep.name, trial=tid, storage_path=args.storage_path)
    try:
        src = locate(ns)
        cfg = ex.config_from_flat(src.config)
        reference = ex.model_from_state_dict(src.state_dict, cfg)
        data = load_data(cfg)
    except (BadInput, ex.ExportError, ConfigError) as e:  # ConfigError: the trial's dataset cannot be loaded here
        fail(str(e))
    objectives = sweep.objectives
    accs = [m for m in objectives if m in ACCURACIES]
    n_val = len(data.val)
    cis = accuracy_intervals(row, accs, n_val)
    twins = indistinguishable(front, chosen, accs, n_val)
    print(f"search.pick {sweep.name}: rule {rule.describe()}; {len(meeting)} of {len(front)} front trial(s) meet it")
    print(f"chosen trial {tid}: " + ", ".join(f"{m} {_fmt(float(row[m]))}" for m in objectives))
    for m, (lo, hi) in cis.items():
        print(f"  validation {m} {_fmt(float(row[m]))}, 95% CI [{_fmt(lo)}, {_fmt(hi)}] (binomial bootstrap, n={n_val})")
    print(f"  cannot be told apart from: {', '.join(twins) if twins else 'no other front trial'} "
          f"(95% bootstrap interval of each accuracy difference contains 0)")

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        line, written, problems = write_files(src.state_dict, cfg, reference, out, f"{sweep.name}-{tid}", meta=None,
                                              check=True, onnx=True)
    except ex.ExportError as e:
        fail(str(e))
    size = Path(line["packed"]).stat().st_size
    if SIZE_KIB in row and pd.notna(row[SIZE_KIB]):
        want = float(row[SIZE_KIB]) * 1024
        if not problems and size != want:
            problems.append(f"the packed file has {size} bytes; the trial reported size_kib {row[SIZE_KIB]} ({want:g} bytes)")
    else:
        print(f"note: trial {tid} reported no {SIZE_KIB} (a sweep from before trials reported it): the file's size "
              "is not compared")
    acc: dict[str, Any] = {}
    if not problems:
        import torch

        x, y = data.test.to_float("cpu")
        with torch.no_grad():
            acc = onnx_recheck(reference, ex.read_header(line["packed"]), Path(line["onnx"]), x, y,
                                  draws=args.draws, batch=cfg.eval_batch_size, seed=cfg.eval_seed,
                                  max_draws=max(args.draws, MAX_DRAWS))
        gap = abs(acc["torch_test_clean_acc"] - acc["onnx_test_clean_acc"])
        if gap > TOLERANCE:
            problems.append(f"onnxruntime test accuracy {acc['onnx_test_clean_acc']:.4f} vs PyTorch "
                            f"{acc['torch_test_clean_acc']:.4f} (> {TOLERANCE * 100:g} pp apart; Monte Carlo SE "
                            f"{acc['test_diff_se'] * 100:.2g} pp: raise --draws if that is the cause)")
        if acc["noise_off_disagreements"]:
            problems.append(f"with the noise off, onnxruntime and PyTorch disagree on {acc['noise_off_disagreements']} "
                            f"test image(s)")
    if problems:
        return check_failed("pick", written, problems)

    shown = [m for m in dict.fromkeys([*objectives, *rule.metrics_needed, SIZE_KIB]) if m in row and pd.notna(row[m])]
    packed_sha = hashlib.sha256(Path(line["packed"]).read_bytes()).hexdigest()
    pick: dict[str, Any] = {
        "sweep": sweep.name, TRIAL_ID: tid, "rule": rule.describe(),
        "objectives": {m: float(row[m]) for m in shown},
        "directions": {m: DIRECTIONS[m] for m in shown},
        "sweep_objectives": list(objectives),
        "candidates": meeting,
        "validation": {"n": n_val, "ci95": {m: list(v) for m, v in cis.items()},
                       "method": "binomial bootstrap from n and the accuracy (no per-image scores are stored)",
                       "indistinguishable_from": twins},
        "files": {"packed": Path(line["packed"]).name, "onnx": Path(line["onnx"]).name},
        "size_bytes": size, SIZE_KIB: size / 1024, "packed_sha256": packed_sha,
        **acc, "test_scoring": f"expected correctness over {acc['test_draws']} noise draws per image, each side; same "
                               f"images in the same batches of {cfg.eval_batch_size}",
        "lineage": {"pick_git_sha": _git_sha(), "dataset": cfg.dataset, "config": src.config},
        "pick_key": hashlib.sha256(f"{sweep.name}/{tid}/{packed_sha}".encode()).hexdigest()[:24],
    }
    if args.register:
        from search.tracking import register_pick

        try:
            pick["registered"] = register_pick(tracking_uri, args.register, args.alias, sweep.record, pick,
                                               Path(line["onnx"]), [Path(line["packed"])])
        except Exception as e:  # noqa: BLE001 - the files are written and checked; say what the registry said
            print(f"error: registering {args.register} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
            return 1
    path = out / PICK_FILE
    atomic_write_text(json.dumps(pick, indent=1, sort_keys=True, default=str) + "\n", path)
    print(f"test accuracy on {acc['test_n']} test images ({acc['test_draws']} noise draws each): PyTorch "
          f"{acc['torch_test_clean_acc']:.4f}, onnxruntime {acc['onnx_test_clean_acc']:.4f} "
          f"(Monte Carlo SE of the difference {acc['test_diff_se'] * 100:.2g} pp; noise off: both "
          f"{acc['torch_test_clean_acc_noise_off']:.4f})")
    print(f"wrote {line['packed']} ({size} bytes = size_kib {size / 1024:g}), {line['onnx']}, {path}")
    if "registered" in pick:
        r = pick["registered"]
        print(f"registry: {r['model']} version {r['version']} ({'new' if r['created'] else 'already registered'}), "
              f"alias {r['alias']}: {r['uri']} at {tracking_uri}")
    return 0


def compare(args: argparse.Namespace, out: Path) -> int:
    """DIR/compare.html: several sweeps' fronts in one plot (search.tracking's views)."""
    from search.tracking import compare_fronts

    names = [s.strip() for s in args.compare.split(",") if s.strip()]
    try:
        if len(names) < 2 or len(set(names)) != len(names):
            raise RuleError(f"--compare {args.compare!r}; accepted: two or more distinct sweep names, comma-separated")
        sweeps = [open_sweep(args.storage_path, n) for n in names]
        common = [m for m in sweeps[0].objectives if all(m in s.objectives for s in sweeps[1:])]
        if len(common) < 2:
            raise RuleError(f"--compare: the sweeps share {len(common)} objective(s) ({', '.join(common) or 'none'}); "
                            "accepted: sweeps with at least two objectives in common")
        tables = {s.name: with_metrics(s, s.front, common) for s in sweeps}
    except RuleError as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    path = compare_fronts(tables, common, out / COMPARE_FILE)
    print(f"wrote {path}: the fronts of {', '.join(names)} over {', '.join(common)} "
          f"({sum(len(t) for t in tables.values())} front trials)")
    return 0
