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


UI_HOST, UI_PORT = "127.0.0.1", 5000  # README: mlflow ui --backend-store-uri sqlite:///... --host 127.0.0.1 --port 5000


def runs_view_url(tracking_uri: str, experiment_id: str) -> str:
    """The link that opens the experiment's runs table. MLflow 3's UI opens an experiment on its
    GenAI (traces) page unless the URL asks for `workflowType=machine_learning`. A server's own
    URL is used (without user:password@); a database store is browsed with `mlflow ui` on
    UI_HOST:UI_PORT.

    Args:
        tracking_uri: the sweep's store.
        experiment_id: its experiment.
    """
    if tracking_uri.startswith(("http://", "https://")):
        scheme, rest = tracking_uri.split("://", 1)
        host, _, path = rest.partition("/")
        base = f"{scheme}://{host.rsplit('@', 1)[-1]}/{path}".rstrip("/")
    else:
        base = f"http://{UI_HOST}:{UI_PORT}"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(tracking_uri: str) -> str | None:
    """The `mlflow ui` command that serves a database store at runs_view_url's address."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"mlflow ui --backend-store-uri {tracking_uri} --host {UI_HOST} --port {UI_PORT}"


def link_lines(tracking_uri: str, experiment_id: str) -> str:
    """`  open     <runs view>` and, for a database store, the `mlflow ui` command serving it.

    Args:
        tracking_uri: the sweep's store.
        experiment_id: its experiment.
    """
    cmd = ui_command(tracking_uri)
    return f"  open     {runs_view_url(tracking_uri, experiment_id)}" + (f"\n           (after: {cmd})" if cmd else "")
