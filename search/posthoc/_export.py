"""`python -m search.export`: take one trained model out of a sweep as a small file.

    python -m search.export --name SWEEP --trial ID --out DIR [--check] [--onnx]

finds the trial's final checkpoint in the Tune experiment <storage-path>/<SWEEP> (model.pt: the
quantized state dict; state.pt: the run's config), writes DIR/<SWEEP>-<ID>.brpk in the packed
low-bit format (trainables.export, docs/export.md) and, with --onnx, DIR/<SWEEP>-<ID>.onnx.
`--run DIR` takes a `python -m trainables.train --out DIR` run instead of a sweep's trial.
--check reloads the packed file and requires logits equal to the trained model's (noise off, and
noise on with the same seed) and the size bound; --onnx always compares onnxruntime with PyTorch
(noise off, 1e-4). Bad input: one line, exit 2, nothing written; a failed check: one line, exit 1,
and the files of this export removed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.storage import SweepLocation
from trainables.cliutil import OneLineParser, fail
from trainables.contract import (
    CHECKPOINT_FILE,
    COMPLETED,
    MODEL_FILE,
    OBJECTIVES,
    RUN_CHECKPOINT_FILE,
    TRIAL_ID,
    TRIALS_FILE,
    trial_dir,
)
from trainables.fileio import unwritable


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m search.export", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="the sweep (--name of search.pareto)")
    p.add_argument("--trial", help="trial id, as in trials.parquet and the printed front")
    p.add_argument("--run", help="instead of --name/--trial: the --out directory of python -m trainables.train")
    p.add_argument("--out", required=True, help="directory for the exported files")
    p.add_argument("--check", action="store_true", help="reload the packed file and compare logits with the trained model")
    p.add_argument("--onnx", action="store_true", help="also write an ONNX model (needs pip install -e '.[export]')")
    p.add_argument("--onnx-noise", choices=("on", "off"), default="on",
                   help="on (default): the EnResNet test-time noise as ONNX random ops; off: deterministic")
    p.add_argument("--onnx-weights", choices=("qdq", "float"), default="qdq",
                   help="qdq (default): quantized weights as int8 codes + DequantizeLinear; float: dequantized constants")
    p.add_argument("--image-size", type=int, help="input side for the checks (default: the dataset's; 32 for folders)")
    p.add_argument("--storage-path", default="./brsearch_results", help="where the sweep lives, as given to search.pareto (a directory, s3://..., gs://...)")
    return p


@dataclass
class Source:
    """A trained model located and read, nothing written yet."""

    label: str  # file stem
    state_dict: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any]


class BadInput(Exception):
    pass


def _load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file is unreadable input
        raise BadInput(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _from_checkpoint(d: Path, label: str, meta: dict[str, Any], state_file: str) -> Source:
    model, state = d / MODEL_FILE, d / state_file
    if not model.exists():
        raise BadInput(f"{d} holds no final model ({MODEL_FILE}): the run did not finish; accepted: a completed trial or run")
    if not state.exists():
        raise BadInput(f"{d} has {MODEL_FILE} but no {state_file} (the run's config)")
    st = _load(state)
    if not isinstance(st, dict) or "config" not in st:
        raise BadInput(f"{state} has no 'config'")
    metrics = {k: st.get("metrics", {}).get(k) for k in (*OBJECTIVES, "size_bits")}
    return Source(label, _load(model), st["config"], {**meta, "checkpoint": str(d), "metrics": metrics})


def _trial_ids(location: SweepLocation) -> dict[str, str]:
    """trial id -> status from trials.parquet (written at the end of a sweep; on s3/gs, the copy
    `locate` fetched), else the trial dirs."""
    table = location.local_dir / TRIALS_FILE
    if table.is_file():
        import pyarrow.parquet as pq

        t = pq.read_table(table, columns=[TRIAL_ID, "status"]).to_pylist()
        return {r[TRIAL_ID]: r["status"] for r in t}
    if location.remote:
        return {}
    prefix = trial_dir("")
    return {p.name[len(prefix):]: "?" for p in location.local_dir.glob(prefix + "*") if p.is_dir()}


def locate(args: argparse.Namespace) -> Source:
    """The sweep's trial (or the trainables.train run) read into memory; BadInput otherwise."""
    if args.run:
        if args.name or args.trial:
            raise BadInput("--run excludes --name/--trial; accepted: --run DIR, or --name SWEEP --trial ID")
        d = Path(args.run).expanduser()
        if not d.is_dir():
            raise BadInput(f"--run {args.run}: no such directory; accepted: the --out of python -m trainables.train")
        return _from_checkpoint(d, d.resolve().name, {"run": str(d.resolve())}, RUN_CHECKPOINT_FILE)
    if not args.name or not args.trial:
        raise BadInput("give --name SWEEP and --trial ID (or --run DIR)")
    location = SweepLocation(args.storage_path, args.name)
    try:
        is_sweep = bool(location.fetch(TRIALS_FILE)) if location.remote else \
            location.local_dir.is_dir() and any(location.local_dir.glob("experiment_state-*.json"))
    except (OSError, ValueError) as e:  # unreachable storage, bad credentials, unknown bucket or scheme
        raise BadInput(f"--storage-path {args.storage_path}: cannot read it: {str(e).splitlines()[0]}") from None
    if not is_sweep:
        parent = location.local_dir.parent
        known = sorted(p.name for p in parent.glob("*/") if any(p.glob("experiment_state-*.json"))) \
            if not location.remote and parent.is_dir() else []
        raise BadInput(f"--name {args.name}: no sweep of that name under {args.storage_path}; accepted: "
                       f"{', '.join(known) if known else 'the --name and --storage-path of a sweep'}")
    trial = args.trial.removeprefix(trial_dir(""))
    ids = _trial_ids(location)
    if trial not in ids:
        raise BadInput(f"--trial {args.trial}: sweep {args.name!r} has no such trial; accepted: {', '.join(sorted(ids)) or '(none)'}")
    if ids[trial] not in (COMPLETED, "?"):
        done = ", ".join(i for i, s in sorted(ids.items()) if s == COMPLETED) or "none"
        raise BadInput(f"--trial {trial} is {ids[trial]}; accepted: a completed trial ({done})")
    ck = location.final_checkpoint(trial)
    if ck is None:
        raise BadInput(f"--trial {trial}: no checkpoint with a final model found in {location.exp_dir}")
    return _from_checkpoint(ck, f"{args.name}-{trial}", {"sweep": args.name, TRIAL_ID: trial}, CHECKPOINT_FILE)


def write_files(state_dict: dict[str, Any], cfg: Any, reference: Any, out: Path, label: str, *,
                meta: dict[str, Any] | None, image_size: int | None = None, check: bool = False, onnx: bool = False,
                onnx_noise: bool = True, onnx_weights: str = "qdq") -> tuple[dict[str, Any], list[Path], list[str]]:
    """Write out/<label>.brpk (and with `onnx`, out/<label>.onnx) and check them: `check` reloads
    the packed file against `reference` (the trained model); the ONNX file is always compared with
    PyTorch. Returns (what was written, as the printed JSON line; the paths; the failed checks).
    `meta=None` writes no provenance into the header, so the file is exactly the trial's size_kib.
    Raises trainables.export.ExportError for weights that cannot be packed."""
    from trainables import export as ex

    packed_path = out / f"{label}.brpk"
    written = [packed_path]
    header = ex.write_packed(state_dict, cfg, packed_path, image_size=image_size, meta=meta)
    size = packed_path.stat().st_size
    line = {"packed": str(packed_path), "bytes": size, "size_bits": header["size_bits"],
            "bound_bytes": ex.size_bound(header["size_bits"]), "bits": cfg.quant.bits}
    problems: list[str] = []
    if check:
        problems += ex.check_packed(packed_path, reference)
        line["check"] = "ok" if not problems else "mismatch"
    if onnx and not problems:
        from trainables import onnx_export as ox

        loaded = ex.load_packed(packed_path)
        x = ex.example_input(loaded.header)
        onnx_path = out / f"{label}.onnx"
        qdq = ox.weight_codes(loaded.model, loaded.header) if onnx_weights == "qdq" else None
        ox.write_onnx(loaded.model, x, onnx_path, noise=onnx_noise, qdq=qdq)
        written.append(onnx_path)
        problems += ox.check_onnx(loaded.model, onnx_path, x, noise=onnx_noise, qdq=qdq)
        line.update(onnx=str(onnx_path), onnx_noise="on" if onnx_noise else "off", onnx_weights=onnx_weights,
                    onnx_check="ok" if not problems else "mismatch")
    return line, written, problems


def check_failed(what: str, written: list[Path], problems: list[str]) -> int:
    """A failed check removes what was written and says why in one line; the exit code is 1."""
    for p in written:
        p.unlink(missing_ok=True)
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    print(f"error: {what} check failed: {problems[0]}{more}", file=sys.stderr)
    return 1


def export_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(os.path.abspath(Path(args.out).expanduser()))
    why = unwritable(out)
    if why:
        fail(f"--out {args.out}: not writable: {why}; accepted: a writable directory")
    if args.image_size is not None and args.image_size < 1:
        fail(f"--image-size {args.image_size}; accepted: an integer >= 1")
    if args.onnx:
        from trainables.onnx_export import available

        missing = available()
        if missing:
            fail(f"--onnx: {missing}")
    from trainables import export as ex

    try:
        src = locate(args)
        cfg = ex.config_from_flat(src.config)
        reference = ex.model_from_state_dict(src.state_dict, cfg)
    except (BadInput, ex.ExportError) as e:
        fail(str(e))
    except RuntimeError as e:  # load_state_dict: weights that do not fit the config's architecture
        fail(f"the weights do not fit the run's config: {str(e).splitlines()[0]}")

    out.mkdir(parents=True, exist_ok=True)
    try:
        line, written, problems = write_files(
            src.state_dict, cfg, reference, out, src.label, meta=src.meta, image_size=args.image_size,
            check=args.check, onnx=args.onnx, onnx_noise=args.onnx_noise == "on", onnx_weights=args.onnx_weights)
    except ex.ExportError as e:
        fail(str(e))
    if problems:
        return check_failed("export", written, problems)
    print(f"wrote {line['packed']} ({line['bytes']} bytes; size_bits/8 = {line['size_bits'] / 8:.0f})"
          + (f" and {line['onnx']}" if args.onnx else ""))
    print(json.dumps(line))
    return 0

