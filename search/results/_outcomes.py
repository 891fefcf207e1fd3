"""What became of a Tune trial (completed / stopped early / failed) and why, in one line.

Shared by the MLflow logger, the progress lines and the result tables. Works on Tune's `Trial`
objects by duck typing, so it imports nothing from Ray.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from trainables.contract import COMPLETED, DIVERGED, EPOCH, FAILED, FAILURE_REASON, STOPPED, TRIAL_ID, is_completed


def trial_outcome(trial: Any) -> tuple[str, str]:
    """(status, reason): completed | stopped (early, by the scheduler) | failed.

    Called from Tune's trial-complete callbacks too, where the trial's status is still RUNNING
    (Tune sets TERMINATED after the callbacks), so the status alone does not decide. A trial that
    never reported still has a last_result holding its trial_id: that is no result.

    Args:
        trial: a Tune Trial (or anything with status, last_result and the error accessors).
    """
    last = {k: v for k, v in (trial.last_result or {}).items() if k != TRIAL_ID}
    if last.get(DIVERGED):  # trainables.tune: non-finite loss or weights (ERROR, or stopped on it)
        return FAILED, str(last.get(FAILURE_REASON) or "DivergedError")[:500]
    if trial.status == "ERROR":
        return FAILED, error_reason(trial)
    if is_completed(last):
        return COMPLETED, ""
    if last:
        return STOPPED, stopped_reason(last)
    return FAILED, "no result"


def stopped_reason(result: dict[str, Any]) -> str:
    """Why a trial that reported but did not complete is off the front (the scheduler stopped it)."""
    return f"stopped after epoch {result.get(EPOCH)}"


def error_reason(trial: Any) -> str:
    """The one line of a trial's error that says why (e.g. `DivergedError: loss is nan ...`)."""
    text = ""
    try:
        err = trial.get_pickled_error()
        text = str(err) if err is not None else ""
    except Exception:
        pass
    if not text and trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b", ln):
            return ln[:500]
    return (lines[-1] if lines else "error")[:500]
