"""Each finished trial's final quantized model as an MLflow logged model (MLflow 3's Models tab),
and the front in the Model Registry (`--register NAME`); `search.pick --register` registers one
picked model (`register_pick`).

A trial's `model.pt` is the exported state dict of the fully quantized network; it is rebuilt as
the `nn.Module` the trial trained (`trainables.models.build_model`, weights already projected)
and logged with `mlflow.pytorch.log_model(model_id=...)` under the trial's child run: the logged
model carries the run's params, the final epoch's metrics (linked by MLflow from the run's step),
an input example and the signature inferred from it. The model is pickled (not `torch.export`ed:
4 s per model against 0.2 s) with `trainables/` as its code path, so `mlflow.pytorch.load_model`
needs nothing of brsearch installed. Every call for a sweep runs on the driver's background MLflow
thread (search.tracking's queue) and is idempotent: a model is looked up by its tags first.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from search.redact import SECRET_PATTERN, redact
from trainables.contract import DIRECTIONS, MINIMIZE, MODEL_FILE, TRIAL_ID, training_config

MODEL_TYPE = "brsearch-enresnet"
IMAGE_SIZE = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "svhn": 32}  # input example only
TRAINABLES = Path(__file__).resolve().parents[2] / "trainables"


class _QuietPickleWarning(logging.Filter):
    """mlflow.pytorch warns on every pickled model; we pickle on purpose (see above): say it once."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Pickle or CloudPickle" not in record.getMessage():
            return True
        first, _QuietPickleWarning.seen = not _QuietPickleWarning.seen, True
        return first


logging.getLogger("mlflow.pytorch").addFilter(_QuietPickleWarning())


def rebuild(config: dict[str, Any], state: dict[str, Any]) -> Any:
    """The trial's network with its quantized weights, in eval mode (the test-time noise stays on,
    as in the trial's own evaluation). Channels and classes come from the weights' shapes."""
    from trainables.config import TrainConfig
    from trainables.models import build_model

    cfg = TrainConfig.from_flat(training_config(config))
    in_channels = int(state["members.0.conv1.weight"].shape[1])
    num_classes = int(state["members.0.fc.weight"].shape[0])
    model = build_model(cfg.depth, cfg.width, in_channels, num_classes, cfg.ensemble, cfg.noise)
    missing, _bookkeeping = model.load_state_dict(state, strict=False)  # extra: quantizer buffers
    if missing:
        raise ValueError(f"{MODEL_FILE} lacks {len(missing)} tensors of the network, e.g. {missing[:3]}")
    return model.eval()


def input_example(config: dict[str, Any], model: Any) -> Any:
    import numpy as np

    channels = int(model.members[0].conv1.weight.shape[1])
    size = IMAGE_SIZE.get(str(config.get("dataset", "")), 32)
    return np.random.default_rng(0).random((2, channels, size, size), dtype=np.float32)


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """A config as MLflow params: credentials left out (by key) or redacted (in values)."""
    return {k: redact(v)[:6000] for k, v in sorted(config.items()) if not SECRET_PATTERN.search(k)}


def find_model(client: MlflowClient, experiment_id: str, run_id: str) -> Any | None:
    """The READY logged model of a child run, or None; half-logged ones (an outage mid-upload)
    are deleted so the caller logs the model afresh."""
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                        max_results=50)
    ready = None
    for m in found:
        if m.tags.get("brsearch.kind") != "trial-model":
            continue
        if m.status == LoggedModelStatus.READY and ready is None:
            ready = m
        elif m.status != LoggedModelStatus.READY:
            client.delete_logged_model(m.model_id)
    return ready


def log_trial_model(client: MlflowClient, run: Any, run_id: str, end: Any) -> str | None:
    """Log a completed trial's final model once.

    Args:
        client: the sweep's MLflow client.
        run: the sweep's SweepRun (experiment, parent run, sweep name).
        run_id: the trial's child run.
        end: the trial's TrialEnd (id, config, final checkpoint, last epoch).

    Returns the model id, or None when the checkpoint has no model file. Raises what MLflow
    raises, for the background queue to retry."""
    experiment_id, sweep, parent_run_id = run.experiment_id, run.sweep, run.parent_run_id
    trial_id, config, checkpoint, step = end.trial_id, end.config, end.checkpoint, end.step
    existing = find_model(client, experiment_id, run_id)
    if existing is not None:
        return existing.model_id
    import mlflow
    import torch

    with checkpoint.as_directory() as d:
        path = Path(d) / MODEL_FILE
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = rebuild(config, state)
    tags = {"brsearch.kind": "trial-model", "brsearch.trial_id": trial_id, "sweep": sweep,
            "brsearch.parent_run_id": parent_run_id, "bits": str(config.get("bits", ""))}
    lm = client.create_logged_model(experiment_id, name=f"{sweep}-{trial_id}", source_run_id=run_id,
                                    tags=tags, params=config_params(config), model_type=MODEL_TYPE)
    mlflow.pytorch.log_model(
        model, name=lm.name, model_id=lm.model_id, run_id=run_id, step=step,
        input_example=input_example(config, model), serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"], code_paths=[str(TRAINABLES)],
    )
    return lm.model_id


def sweep_models(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every READY trial model of the sweep."""
    out, token = [], None
    while True:
        page = client.search_logged_models(
            [experiment_id], filter_string=f"tags.`brsearch.parent_run_id` = '{parent_run_id}'",
            max_results=100, page_token=token)
        out += [m for m in page if m.status == LoggedModelStatus.READY]
        token = page.token
        if not token:
            return out


def tag_front(client: MlflowClient, experiment_id: str, parent_run_id: str, on_front: set[str]) -> dict[str, str]:
    """Tag each trial model pareto=true/false; returns trial id -> model id."""
    ids = {}
    for m in sweep_models(client, experiment_id, parent_run_id):
        tid = m.tags.get("brsearch.trial_id", "")
        ids[tid] = m.model_id
        flag = "true" if tid in on_front else "false"
        if m.tags.get("pareto") != flag:
            client.set_logged_model_tags(m.model_id, {"pareto": flag})
    return ids


def register_front(client: MlflowClient, name: str, front_df: Any, models: dict[str, str],
                   run_ids: dict[str, str], objectives: tuple[str, ...]) -> list[str]:
    """Register each front model as a version of `name` (once, also across --resume), with the
    aliases `front-<trial id>` and `best-<objective>` for the front's best trial on each
    objective (the smallest, for a minimized one). Returns the aliases set."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="brsearch Pareto-front models (one version per front trial)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = {v.tags.get("brsearch.model_id"): v.version
                for v in client.search_model_versions(f"name = '{name}'", max_results=10000)}
    aliases = []
    for row in front_df.itertuples():
        tid = row.trial_id
        mid = models.get(tid)
        if mid is None:
            continue
        if mid not in versions:
            v = client.create_model_version(name, f"models:/{mid}", run_id=run_ids.get(tid),
                                            tags={"brsearch.model_id": mid, "brsearch.trial_id": tid},
                                            model_id=mid)
            versions[mid] = v.version
        alias = "front-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in tid)
        client.set_registered_model_alias(name, alias, versions[mid])
        aliases.append(alias)
    for m in objectives:
        if len(front_df):
            tid = front_df.sort_values(m, ascending=DIRECTIONS.get(m) == MINIMIZE).iloc[0][TRIAL_ID]
            if tid in models:
                alias = "best-" + m.replace("_", "-")
                client.set_registered_model_alias(name, alias, versions[models[tid]])
                aliases.append(alias)
    return aliases


PICK_KEY_TAG = "brsearch.pick_key"


def register_pick(tracking_uri: str, model: str, alias: str, record: dict[str, Any], pick: dict[str, Any],
                  onnx_path: Path, extra_files: list[Path]) -> dict[str, Any]:
    """`search.pick --register`: one version of `model` for a pick, with lineage tags and `alias`.

    The ONNX file is logged as an MLflow logged model (onnx flavour, CPU provider, `extra_files`
    beside it) under the trial's child run, then registered. A version with the same
    `brsearch.pick_key` (same sweep, trial and packed bytes) is reused, so a rerun adds nothing
    and only sets the alias again.

    Args:
        tracking_uri: the MLflow store.
        model: the registered model's name.
        alias: the alias set on the version.
        record: the sweep's sweep.json (experiment and parent run ids).
        pick: what pick.json holds (sweep, trial id, rule, objectives, lineage, accuracies, pick_key).
        onnx_path: the ONNX model.
        extra_files: files logged beside it (the packed file).

    Returns model, version, alias, created (False: the version was already there), uri and the
    sweep's git commit."""
    import json

    import mlflow
    import onnx
    from mlflow.exceptions import MlflowException

    from search.redact import redact_obj

    from ._writer import SweepRun, child_runs

    client = MlflowClient(tracking_uri)
    key, trial_id = pick["pick_key"], pick[TRIAL_ID]
    try:
        client.create_registered_model(model, description="brsearch picks: one deployable model per version "
                                                          "(python -m search.pick)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    exp, parent = record.get("experiment_id"), record.get("parent_run_id")
    run_id = git_sha = None
    if exp and parent:
        child = child_runs(client, SweepRun(tracking_uri, exp, parent, pick["sweep"])).get(trial_id)
        run_id = child.info.run_id if child is not None else None
        git_sha = client.get_run(parent).data.tags.get("git_sha")
    found = client.search_model_versions(f"name = '{model}' and tags.`{PICK_KEY_TAG}` = '{key}'")
    if found:
        version = found[0].version
    else:
        lineage = pick["lineage"]
        tags = {PICK_KEY_TAG: key, "brsearch.sweep": pick["sweep"], "brsearch.trial_id": trial_id,
                "brsearch.git_sha": git_sha or lineage.get("pick_git_sha") or "unknown",
                "brsearch.dataset": str(lineage.get("dataset")), "brsearch.rule": pick["rule"],
                "brsearch.objectives": json.dumps(pick["objectives"], sort_keys=True),
                "brsearch.config": json.dumps(redact_obj(lineage.get("config", {})), sort_keys=True, default=str),
                "brsearch.size_bytes": str(pick["size_bytes"]),
                "brsearch.torch_test_clean_acc": f"{pick['torch_test_clean_acc']:.6f}",
                "brsearch.onnx_test_clean_acc": f"{pick['onnx_test_clean_acc']:.6f}"}
        if not git_sha:
            tags["brsearch.git_sha_source"] = "the checkout that ran search.pick (the sweep's parent run has no git_sha)"
        mlflow.set_tracking_uri(tracking_uri)
        lm = client.create_logged_model(exp or client.get_experiment_by_name("Default").experiment_id,
                                        name=f"{pick['sweep']}-{trial_id}", source_run_id=run_id,
                                        tags={"brsearch.kind": "pick", PICK_KEY_TAG: key}, model_type=MODEL_TYPE)
        mlflow.onnx.log_model(onnx.load(str(onnx_path)), name=lm.name, model_id=lm.model_id, run_id=run_id,
                              save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
                              extra_files=[str(f) for f in extra_files])
        version = client.create_model_version(model, f"models:/{lm.model_id}", run_id=run_id, tags=tags,
                                              model_id=lm.model_id).version
    client.set_registered_model_alias(model, alias, version)
    return {"model": model, "version": str(version), "alias": alias, "created": not found,
            "uri": f"models:/{model}@{alias}", "sweep_git_sha": git_sha}
