"""`--warm-start NAME`: a new sweep's study begins with the finished trials of earlier sweeps, so its
sampler fits its model on what is already known instead of starting from random proposals.

Each earlier sweep is read from its own records: its Optuna study (the parameters as sampled, raw
values of `zero_below` parameters included) and its trials.parquet (every metric, so a new
objective such as size_kib can be read for an old trial). An old trial is replayed through the new
space with `optuna.trial.FixedTrial`, which asks exactly what the new space asks: a parameter the
new space does not ask for is dropped, a trial missing one it asks for or holding a value outside
its range is refused, each with one line. A sweep whose pinned values differ from the new one's
(another dataset, another epoch budget) measured something else: it is refused before anything is
written. Imported trials enter the study as COMPLETE Optuna trials (`Study.add_trials`) with the
new sweep's objectives and constraints and a `brsearch.imported_from` attribute; they are not run
again, and the new sweep's tables list them with `imported_from` set.

TPE and GP use a model once the study holds `n_startup_trials` (10) finished trials, imported
ones included; with fewer, the first proposals are still random.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from search.front import Floors
from search.optimizer import RAY_TRIAL_ID, Space
from search.storage import SweepLocation
from trainables.config import ConfigError
from trainables.contract import COMPLETED, TRIAL_ID, TRIALS_FILE

IMPORTED_FROM = "brsearch.imported_from"  # Optuna user attribute and the tables' `imported_from`
SOURCE_TRIAL = "brsearch.source_trial"
# pinned values that change where or how a trial runs, not what it measures
NEUTRAL_FIXED = {"data_root", "download", "device", "latency", "eval_batch_size", "precision",
                 "channels_last", "compile", "deterministic"}


@dataclass(frozen=True)
class Imported:
    """What a warm start adds: the Optuna trials and the table rows beside them."""

    trials: list[Any]  # optuna FrozenTrial
    rows: list[dict[str, Any]]  # trials.parquet rows, `imported_from` set
    notes: list[str]  # one line per dropped parameter or refused trial


def _in_range(dist: Any, value: Any) -> bool:
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        return value in dist.choices
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and dist.low - 1e-12 <= v <= dist.high + 1e-12


def _conflicts(old: dict[str, Any], new: Space) -> list[str]:
    """Values both sweeps pinned, differently."""
    return sorted(k for k in (set(old) & set(new.fixed)) - NEUTRAL_FIXED if old[k] != new.fixed[k])


def load_sweep(storage_path: str, name: str) -> tuple[dict[str, Any], list[Any], list[dict[str, Any]]]:
    """(record, finished Optuna trials, trials.parquet rows) of sweep `name`; ConfigError if none."""
    import optuna
    import pyarrow.parquet as pq

    from search.storage import open_study_storage

    loc = SweepLocation(storage_path, name)
    record = loc.read_record()
    if record is None:
        raise ConfigError(f"--warm-start {name}: no sweep of that name under {storage_path}; accepted: the --name of an "
                          f"earlier sweep under the same --storage-path")
    got = loc.fetch(TRIALS_FILE)
    if not got:
        raise ConfigError(f"--warm-start {name}: the sweep has no {TRIALS_FILE} (it never ended); accepted: a sweep "
                          f"that ended (or was resumed to its end)")
    rows = pq.read_table(got[0]).to_pylist()
    loc.pull_state()
    study = optuna.load_study(study_name=name, storage=open_study_storage(record.get("study_spec") or loc.study_spec()))
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return record, finished, rows


def import_trials(storage_path: str, names: tuple[str, ...], space: Space, floors: Floors,
                  own_name: str) -> Imported:
    """The finished trials of sweeps `names` fitted to `space` and `floors`' objectives.
    Raises ConfigError (one line) for an unknown sweep or one whose pinned values conflict."""
    import optuna

    trials, rows, notes = [], [], []
    for name in dict.fromkeys(names):
        if name == own_name:
            raise ConfigError(f"--warm-start {name}: that is this sweep; accepted: an earlier sweep's --name")
        record, finished, table = load_sweep(storage_path, name)
        old_fixed = dict((record.get("space") or {}).get("fixed") or {})
        bad = _conflicts(old_fixed, space)
        if bad:
            k = bad[0]
            raise ConfigError(f"--warm-start {name}: its space conflicts with this sweep's: {k}={old_fixed.get(k)!r} "
                              f"there, {space.fixed.get(k, '(searched)')!r} here; accepted: a sweep with the same "
                              f"pinned values ({', '.join(bad)} differ)")
        by_id = {r[TRIAL_ID]: r for r in table if r.get("status") == COMPLETED}
        dropped: dict[str, int] = {}
        refused: dict[str, int] = {}
        for ft in finished:
            row = by_id.get(ft.user_attrs.get(RAY_TRIAL_ID))
            if row is None:
                refused["not completed in its trials table"] = refused.get("not completed in its trials table", 0) + 1
                continue
            pinned_apart = [k for k, v in ft.params.items() if k in space.fixed and k not in NEUTRAL_FIXED
                            and space.fixed[k] != v]
            if pinned_apart:
                k = pinned_apart[0]
                why = f"{k}={ft.params[k]!r} there, pinned to {space.fixed[k]!r} here"
                refused[why] = refused.get(why, 0) + 1
                continue
            # the old sweep's pinned values answer a parameter this space searches
            fixed_trial = optuna.trial.FixedTrial({**old_fixed, **ft.params})
            try:
                with warnings.catch_warnings():  # out-of-range values are refused below, by name
                    warnings.simplefilter("ignore", UserWarning)
                    space.suggest(fixed_trial)
            except ValueError as e:  # FixedTrial: a parameter the new space asks for is missing
                why = str(e).split(".")[0]
                refused[why] = refused.get(why, 0) + 1
                continue
            dists = fixed_trial.distributions
            out = [p for p, d in dists.items() if not _in_range(d, fixed_trial.params[p])]
            if out:
                why = f"{out[0]}={fixed_trial.params[out[0]]!r} is outside this space's range"
                refused[why] = refused.get(why, 0) + 1
                continue
            for p in set(ft.params) - set(dists) - set(space.fixed):
                dropped[p] = dropped.get(p, 0) + 1
            values = [row.get(m) for m in floors.objectives]
            if any(v is None or not math.isfinite(float(v)) for v in values):
                missing = [m for m, v in zip(floors.objectives, values) if v is None]
                why = f"no {missing[0] if missing else 'finite objectives'} reported"
                refused[why] = refused.get(why, 0) + 1
                continue
            trials.append(optuna.trial.create_trial(
                params={p: fixed_trial.params[p] for p in dists}, distributions=dict(dists),
                values=[float(v) for v in values], constraints=floors.constraints(row) or None,
                user_attrs={IMPORTED_FROM: name, SOURCE_TRIAL: row[TRIAL_ID]}))
            rows.append({**row, "imported_from": name})
        notes += [f"--warm-start {name}: parameter {p} is not in this space; dropped from {n} trial(s)"
                  for p, n in sorted(dropped.items())]
        notes += [f"--warm-start {name}: {n} trial(s) not imported: {why}" for why, n in sorted(refused.items())]
        notes.append(f"--warm-start {name}: {sum(1 for r in rows if r['imported_from'] == name)} finished trial(s) imported")
    return Imported(trials, rows, notes)


def seed_study(study: Any, imported: Imported) -> int:
    """Add the imported trials to `study` unless a previous start (a resume) already did; returns
    how many were added."""
    have = {(t.user_attrs.get(IMPORTED_FROM), t.user_attrs.get(SOURCE_TRIAL)) for t in study.get_trials(deepcopy=False)}
    new = [t for t in imported.trials if (t.user_attrs[IMPORTED_FROM], t.user_attrs[SOURCE_TRIAL]) not in have]
    study.add_trials(new)
    return len(new)
