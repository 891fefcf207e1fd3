"""Tracking URIs without importing MLflow: `search.pareto` checks `--tracking-uri` before the
heavy imports, so a bad value fails in well under a second."""
from __future__ import annotations

from pathlib import Path


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db is relative to the cwd, which Tune changes; pin it down."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a bare path means a sqlite file
        return "sqlite:///" + str(Path(uri).resolve())
    return uri
