"""The one module of `trainables` that knows Ray: the training loop as a Tune function trainable.

Every epoch reports all three objectives (Tune rejects a result that lacks a searcher metric),
measured on the validation split, and a checkpoint; the final report carries the objectives on the
whole validation split, the one test-split evaluation under `test_*` names (reported, never
selected on) and the quantized model. It uses
`ray.tune.*` only: `ray.train.*` inside a Tune function is an error since Ray 2.51.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

from .config import ConfigError, TrainConfig
from .contract import (
    CHECKPOINT_FILE,
    DIVERGED,
    EPOCH,
    FAILURE_REASON,
    FINAL,
    MODEL_FILE,
    NODE_ID,
    OBJECTIVES,
    REPORTS_FILE,
    checkpoint_index,
    training_config,
)
from .fileio import patiently
from .loop import DivergedError, Hooks, train


class TuneHooks(Hooks):
    """Reports to Tune with a checkpoint per epoch. Each checkpoint also holds every report of the
    trial so far (REPORTS_FILE): Tune's own result.json of a trial continued after a driver crash
    starts again empty, so these are the one record of its earlier epochs (`stored_reports`)."""

    def __init__(self) -> None:
        self.epoch = 0  # epochs completed as of the last report (or the checkpoint restored)
        self.diverged_before = False  # restored from a diverged trial's marker
        self.reports: list[dict[str, Any]] = []

    def load_checkpoint(self) -> dict[str, Any] | None:
        ck = tune.get_checkpoint()
        if ck is None:
            return None
        state, used, why = readable_state(ck)
        trial = tune.get_context().get_trial_id()
        if why:  # one line: which checkpoint was torn or gone, and where the trial goes on from
            print(f"trial {trial}: {Path(ck.path).name} is unreadable ({why}); "
                  + (f"resuming from {used}" if state is not None else "no earlier readable checkpoint, starting over"),
                  flush=True)
        if state is None:
            return None
        if state.get(DIVERGED):  # a retry of a diverged trial: fail again at once, no retraining
            self.diverged_before = True
            raise DivergedError(state[DIVERGED])
        self.epoch = int(state.get(EPOCH, 0))
        self.reports = [r for r in state.pop(REPORTS_FILE, []) if int(r.get(EPOCH, 0)) <= self.epoch]
        print(f"trial {trial}: resumed after epoch {self.epoch}", flush=True)
        return state

    def report_diverged(self, error: DivergedError) -> None:
        """The last report of a diverged trial: objectives NaN (no point of any front), the flag
        and the reason, and a checkpoint holding only the marker. Training is deterministic, so a
        retry from the previous checkpoint would diverge again: a restored attempt raises at once
        (load_checkpoint), and the driver stops Tune's retries on the flag
        (search.driver.NoRetryOnDivergence). `epoch` stays the last completed one, so a
        scheduler makes no new rung decision on this result."""
        metrics = {**{m: float("nan") for m in OBJECTIVES}, DIVERGED: True,
                   FAILURE_REASON: f"DivergedError: {error}", FINAL: False, EPOCH: self.epoch}
        with tempfile.TemporaryDirectory() as d:
            torch.save({DIVERGED: str(error), EPOCH: self.epoch}, Path(d) / CHECKPOINT_FILE)
            self._report(metrics, d)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any], final: bool) -> None:
        self.epoch = int(metrics.get(EPOCH, self.epoch))
        model = checkpoint.pop("quantized_model", None)
        with tempfile.TemporaryDirectory() as d:
            torch.save(checkpoint, Path(d) / CHECKPOINT_FILE)
            if model is not None:
                torch.save(model, Path(d) / MODEL_FILE)
            # node_id: which Ray node ran the trial (trials.parquet shows how a sweep used the cluster)
            self._report({**metrics, FINAL: final, NODE_ID: _node_id()}, d)

    def _report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        """tune.report with a checkpoint, tried again while the storage is away: Tune uploads the
        checkpoint before it queues the result, so a failed upload reported nothing yet."""
        # stamped as Tune stamps a result, so a replayed row is the one logged live
        self.reports.append({**metrics, "timestamp": int(time.time())})
        (Path(checkpoint_dir) / REPORTS_FILE).write_text(json.dumps(self.reports, default=str))
        patiently(lambda: tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(checkpoint_dir)),
                  "upload a checkpoint")


def readable_state(ck: tune.Checkpoint) -> tuple[dict[str, Any] | None, str, str]:
    """The training state in `ck`, or where it is torn (a crash mid-write on a file system that
    lost the unsynced tail) or gone, in the trial's newest readable checkpoint: its older ones
    newest first, then any newer ones. Returns the state (None: none readable), the checkpoint
    folder it came from, and why `ck` itself could not be read ("" when it could)."""
    why = ""
    cands: list[tune.Checkpoint] = [ck]
    while cands:
        cand = cands.pop(0)
        try:
            state = patiently(lambda: _load(cand), f"download {cand.path}")  # noqa: B023 - called at once
            return state, Path(cand.path).name, why
        except Exception as e:  # noqa: BLE001 - truncated zip, EOF, unpickling error, missing file
            if not why:  # the one Tune named: look at the others only now
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
                cands = _siblings(ck)
    return None, "", why


def _load(ck: tune.Checkpoint) -> dict[str, Any]:
    """The state, with the trial's reports under REPORTS_FILE (none in a checkpoint written
    before reports were kept); a torn reports file makes the checkpoint unreadable, as a torn state."""
    with ck.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        reports = Path(d) / REPORTS_FILE
        state[REPORTS_FILE] = json.loads(reports.read_text()) if reports.exists() else []
        return state


def _checkpoint_folders(fs: Any, trial_path: str) -> list[tuple[int, str]]:
    """(N, path) of the checkpoint_NNNNNN folders in a trial's directory, oldest first."""
    import pyarrow.fs as pafs

    try:
        infos = patiently(lambda: fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True)),
                          f"list {trial_path}")
    except OSError:
        return []
    return sorted((n, i.path) for i in infos
                  if i.type == pafs.FileType.Directory and (n := checkpoint_index(i.base_name)) is not None)


def _siblings(ck: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The other checkpoint_NNNNNN folders of ck's trial: older ones newest first, then newer ones."""
    path = Path(ck.path)
    me = checkpoint_index(path.name)
    if me is None:
        return []
    found = _checkpoint_folders(ck.filesystem, path.parent.as_posix())
    order = [p for n, p in reversed(found) if n < me] + [p for n, p in found if n > me]
    return [tune.Checkpoint(p, filesystem=ck.filesystem) for p in order]


def stored_reports(fs: Any, trial_path: str) -> list[dict[str, Any]]:
    """Every report of a trial as its newest readable checkpoint holds them (REPORTS_FILE), for
    epochs that Tune's result.json lost; [] when no checkpoint holds any."""
    for _, folder in reversed(_checkpoint_folders(fs, trial_path)):
        try:
            raw = patiently(lambda: _read_bytes(fs, f"{folder}/{REPORTS_FILE}"), f"read {folder}")  # noqa: B023 - called at once
            return list(json.loads(raw))
        except Exception:  # noqa: BLE001 - missing (an older checkpoint) or torn: try the one before
            continue
    return []


def _read_bytes(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def trial_device(requested: str, gpu_ids: list[str]) -> str:
    """The device a trial trains on, given the GPUs Ray assigned it (`ray.get_gpu_ids()`).

    auto is the first assigned GPU, or the CPU without one or without CUDA (a CPU-only trial must not grab a GPU
    it was not given). cuda / cuda:N name the first / N-th GPU *of the trial's own*; in a trial
    without a GPU, or past the ones it has, they are refused with a one-line ConfigError."""
    if requested == "cpu" or (requested == "auto" and not (gpu_ids and torch.cuda.is_available())):
        return "cpu"  # (logical GPUs without CUDA, as in the tests: the CPU)
    index = int(requested.split(":", 1)[1]) if ":" in requested else 0
    if not gpu_ids:
        raise ConfigError(f"device={requested!r} in a trial that Ray gave no GPU; accepted: auto or cpu, "
                          f"or a sweep with --gpus-per-trial > 0")
    if index >= len(gpu_ids):
        raise ConfigError(f"device={requested!r} but the trial was given {len(gpu_ids)} GPU(s); "
                          f"accepted: cuda or cuda:0 to cuda:{len(gpu_ids) - 1}")
    # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPUs, so cuda:N is the N-th of them; where that
    # is switched off (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES) every GPU is visible: map to
    # the physical index Ray assigned
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        return f"cuda:{gpu_ids[index]}"
    return f"cuda:{index}"


def _gpu_ids() -> list[str]:
    import ray

    return [str(g) for g in ray.get_gpu_ids()]


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def trainable(config: dict[str, Any], data_at: dict[str, Any] | None = None) -> None:
    """Ray Tune entry point: `config` holds flat TrainConfig keys (sampled and pinned); `data_at`
    (dataset, data_root, download), where the data sits for this run of the sweep, replaces the
    config's: a trial restored on another machine or from another directory reads it there."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # the driver logs to MLflow; trials never do
    cfg = TrainConfig.from_flat(training_config({**config, **(data_at or {})}))
    resources = tune.get_context().get_trial_resources().required_resources
    cfg.device = trial_device(cfg.device, _gpu_ids())
    if cfg.device.startswith("cuda") and 0 < resources.get("GPU", 0) < 1:
        # a fractional GPU: the trial's share of the memory is a hard limit (an out-of-memory
        # error in this trial, not in the trials it shares the GPU with)
        torch.cuda.set_per_process_memory_fraction(float(resources["GPU"]), torch.device(cfg.device))
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    hooks = TuneHooks()
    try:
        train(cfg, hooks)
    except DivergedError as e:  # the trial fails alone, with the reason, and is not retried
        if not hooks.diverged_before:
            hooks.report_diverged(e)
        raise
