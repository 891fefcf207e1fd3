"""The agreement between the sweep and a trial, in one place.

A trial (trainables.tune) reports results under these keys and writes these files; the sweep
(search/) reads them, decides what "completed" and "feasible" mean with the two rules below, and
writes its tables and state under these names. Nothing else in the project spells them out, so a
renamed key or file changes here and nowhere else (tests/test_hygiene.py checks that no other
product module holds one of these literals).

Importable without torch, Ray, Optuna or MLflow: the command line checks its input against it
before anything heavy is imported.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CHANNEL_SPARSITY", "CLEAN_ACC", "ROBUST_ACC", "DIRECTIONS", "LATENCY_MS", "LATENCY_SPREAD_MS", "LATENCY_THREADS",
    "MAXIMIZE", "MAX_OBJECTIVES", "MINIMIZE", "MIN_OBJECTIVES", "ObjectiveError", "SIZE_KIB", "parse_objectives", "CHECKPOINT_FILE", "COMPLETED", "DIVERGED", "EPOCH", "FAILED", "FAILURE_REASON", "FINAL", "FRONT_FILE", "FRONT_TABLE",
    "INTERRUPTED", "LOST", "MAX_EPOCHS", "MODEL_FILE", "NODE_ID", "OBJECTIVES", "RECORD_FILE", "REPORTS_FILE", "RUNNING", "RUN_CHECKPOINT_FILE", "RUN_METRICS_FILE",
    "STATE_DIR", "STATUSES", "STOPPED", "STRONG_EVAL_FILE", "STUDY_JOURNAL", "STUDY_SQLITE", "SWITCH_SUFFIX",
    "TABLE_SUFFIXES", "TRIALS_FILE", "TRIALS_TABLE", "TRIAL_ID", "checkpoint_index", "is_completed", "is_feasible", "switch_name", "table_files",
    "training_config", "trial_dir",
]

# --- objectives ------------------------------------------------------------------------------
CLEAN_ACC = "clean_acc"  #: accuracy on clean inputs
ROBUST_ACC = "robust_acc"  #: accuracy under the evaluation attack (PGD)
CHANNEL_SPARSITY = "channel_sparsity"  #: share of output channels whose weights are all zero
SIZE_KIB = "size_kib"  #: exact size of the packed export file (trainables.export.write_packed), KiB
LATENCY_MS = "latency_ms"  #: median batch-1 inference time of the exported ONNX model in onnxruntime
LATENCY_SPREAD_MS = "latency_iqr_ms"  #: interquartile range of the latency samples
LATENCY_THREADS = "ort_threads"  #: onnxruntime intra-op threads the latency was measured with
MAXIMIZE, MINIMIZE = "max", "min"  #: directions, spelled as Ray Tune's `mode`
#: Every metric a trial reports that a sweep may optimise, with its direction.
DIRECTIONS: dict[str, str] = {CLEAN_ACC: MAXIMIZE, ROBUST_ACC: MAXIMIZE, CHANNEL_SPARSITY: MAXIMIZE,
                              SIZE_KIB: MINIMIZE, LATENCY_MS: MINIMIZE}
#: What a sweep optimises by default, all maximised; every objective is measured on the validation
#: split (never on test) or on the model itself (size, latency). `--objectives` picks 2 to 4.
OBJECTIVES: tuple[str, ...] = (CLEAN_ACC, ROBUST_ACC, CHANNEL_SPARSITY)
MIN_OBJECTIVES, MAX_OBJECTIVES = 2, 4


class ObjectiveError(ValueError):
    """An `--objectives` value that names an unknown metric or direction; the message is one line."""


def parse_objectives(spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`clean_acc,robust_acc,size_kib` (or `size_kib:min`, each name with an optional direction)
    -> (names, directions). A direction other than the metric's own is refused: maximizing bytes
    or minimizing accuracy is a typo, never a search anyone wants."""
    names: list[str] = []
    directions: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        name, _, direction = item.partition(":")
        if name not in DIRECTIONS:
            raise ObjectiveError(f"unknown objective {name!r}; accepted: {', '.join(DIRECTIONS)}")
        want = DIRECTIONS[name]
        if direction and direction != want:
            raise ObjectiveError(f"unknown direction {direction!r} for {name}; accepted: {want} "
                                 f"({name} is {'maximized' if want == MAXIMIZE else 'minimized'})")
        if name in names:
            raise ObjectiveError(f"objective {name!r} given twice in {spec!r}")
        names.append(name)
        directions.append(want)
    if not MIN_OBJECTIVES <= len(names) <= MAX_OBJECTIVES:
        raise ObjectiveError(f"--objectives takes {MIN_OBJECTIVES} to {MAX_OBJECTIVES} objectives; got "
                             f"{len(names)} in {spec!r}")
    return tuple(names), tuple(directions)

# --- result keys a trial reports and the sweep reads -----------------------------------------
EPOCH = "epoch"  #: epochs completed as of this report
MAX_EPOCHS = "max_epochs"  #: the trial's epoch budget
FINAL = "final"  #: True on the report that carries the fully quantized model's evaluation
DIVERGED = "diverged"  #: True when the loss or weights went non-finite (also a checkpoint marker)
FAILURE_REASON = "failure_reason"  #: one line saying why a diverged trial failed
NODE_ID = "node_id"  #: the Ray node that ran the report's epoch
TRIAL_ID = "trial_id"  #: Tune's trial id (a result key and the tables' key column)

# --- file names ------------------------------------------------------------------------------
CHECKPOINT_FILE = "state.pt"  #: training state inside a Tune checkpoint (model, optimizer, RNG, metrics)
MODEL_FILE = "model.pt"  #: the quantized model, in the final checkpoint only
REPORTS_FILE = "reports.json"  #: every report of a trial up to its checkpoint, beside CHECKPOINT_FILE
RUN_CHECKPOINT_FILE = "checkpoint.pt"  #: a `trainables.train` run's training state (its --out folder)
RUN_METRICS_FILE = "metrics.json"  #: a `trainables.train` run's final metrics
STATE_DIR = "brsearch"  #: the sweep's own files inside its experiment directory
RECORD_FILE = "sweep.json"  #: the sweep's record: flags, space, MLflow ids (what --resume adopts)
STUDY_JOURNAL = "optuna.journal"  #: the Optuna study (JournalStorage), the default
STUDY_SQLITE = "optuna.db"  #: the Optuna study of a sweep started with a sqlite study
STRONG_EVAL_FILE = "strong_eval.json"  #: search.evaluate's per-trial results, keyed by suite settings
TRIALS_TABLE = "trials"  #: every trial: config, status, reason, metrics
FRONT_TABLE = "pareto"  #: the Pareto front's rows
TABLE_SUFFIXES = ("parquet", "csv")  #: each table is written in these formats


def trial_dir(trial_id: str) -> str:
    """A trial's directory inside the experiment directory."""
    return f"trial_{trial_id}"


def table_files(table: str) -> tuple[str, ...]:
    """The file names of one table (TRIALS_TABLE or FRONT_TABLE), Parquet first."""
    return tuple(f"{table}.{s}" for s in TABLE_SUFFIXES)


TRIALS_FILE = table_files(TRIALS_TABLE)[0]  #: trials.parquet, what the tools after a sweep read
FRONT_FILE = table_files(FRONT_TABLE)[0]  #: pareto.parquet


# --- trial statuses (trials.parquet's `status`, MLflow's `brsearch.status` tag) ---------------
COMPLETED = "completed"  #: ran all its epochs; its final report holds the objectives
STOPPED = "stopped"  #: stopped early by the scheduler (MO-ASHA); Optuna has it as PRUNED
FAILED = "failed"  #: raised, diverged or never reported; Optuna has it as FAIL
INTERRUPTED = "interrupted"  #: left unfinished by an interrupted sweep; --resume continues it
RUNNING = "running"  #: started, not finished (MLflow tag only)
LOST = "lost"  #: an MLflow child run no stored trial accounts for (a crash before Tune saved it)
STATUSES = (COMPLETED, STOPPED, FAILED, INTERRUPTED)  #: what trials.parquet holds

# --- the search space's switches ---------------------------------------------------------------
#: A space parameter with `allow_zero` is sampled on a log scale plus a categorical switch
#: `<name>_on`; when the switch is False the parameter is 0. The switch is no training flag.
SWITCH_SUFFIX = "_on"


def switch_name(param: str) -> str:
    """The categorical switch that turns `param` off (to exactly 0)."""
    return param + SWITCH_SUFFIX


def training_config(sampled: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's config (sampled and pinned values) as training flags: the switches dropped.

    A key counts as a switch only when the parameter it switches is also in the config, so a
    training flag that happens to end in `_on` is kept."""
    return {k: v for k, v in sampled.items()
            if not (k.endswith(SWITCH_SUFFIX) and k[:-len(SWITCH_SUFFIX)] in sampled)}


def checkpoint_index(folder: str) -> int | None:
    """N of Tune's checkpoint folder `checkpoint_00000N` in a trial's directory; None for any other name."""
    head, _, digits = folder.partition("_")
    return int(digits) if head == "checkpoint" and digits.isdigit() else None


# --- the two rules -----------------------------------------------------------------------------
def is_completed(result: Mapping[str, Any] | None) -> bool:
    """A trial's last result says it ran its whole budget: the final report, not diverged, at
    epoch >= max_epochs (a result without max_epochs counts a budget of 1)."""
    if not result or result.get(DIVERGED):
        return False
    return bool(result.get(FINAL)) and result.get(EPOCH, 0) >= result.get(MAX_EPOCHS, 1)


def is_feasible(values: Mapping[str, Any], bounds: Mapping[str, float | None]) -> bool:
    """A trial's metrics (name -> value) are within the sweep's bounds (name -> bound): a maximized
    metric at least its floor, clean accuracy strictly above it (a model at chance is useless), a
    minimized one at most its cap; a None bound only asks for a finite value. A missing or
    non-finite value is never feasible."""
    for name, bound in bounds.items():
        v = values.get(name)
        if v is None or isinstance(v, bool) or not math.isfinite(float(v)):
            return False
        if bound is None:
            continue
        if DIRECTIONS.get(name, MAXIMIZE) == MINIMIZE:
            if float(v) > bound:
                return False
        elif float(v) < bound or (name == CLEAN_ACC and float(v) == bound):
            return False
    return True
