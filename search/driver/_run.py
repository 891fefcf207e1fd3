"""`python -m search.pareto`: the distributed Pareto sweep.

Ray Tune runs one adversarial Binary-Relax training per trial, Optuna proposes configurations
(three objectives, all maximised: clean accuracy, robust accuracy, channel sparsity), and the
driver logs everything to MLflow. With no arguments it runs a small local sweep on the embedded
digits data. Every input is checked (search.plan) before Ray starts or anything is written.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from trainables.cliutil import fail
from trainables.config import ConfigError

from .objectives import OBJECTIVES, resolve_sampler
from .plan import Plan, build_parser, device_refusal, prepare

# --- running ---------------------------------------------------------------------------------

def _connect(plan: Plan) -> None:
    import ray

    try:
        if plan.address:
            ray.init(address=plan.address, log_to_driver=not plan.args.quiet)
        else:
            # "local": a new instance even where `ray start` left a cluster to auto-detect
            ray.init(address="local", num_cpus=plan.args.num_cpus, include_dashboard=False,
                     log_to_driver=not plan.args.quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        fail(f"cannot reach the Ray cluster at {plan.address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; accepted: a running cluster's address, 'auto' on its head node, or no --address for a local run")


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _sampler_label(args: Any) -> str:
    """`auto (gp)`: the name the user gave and the sampler it resolved to for this sweep."""
    actual = resolve_sampler(args.sampler, args.trials, args.scheduler)
    return args.sampler if actual == args.sampler else f"{args.sampler} ({actual})"


def build_tuner(plan: Plan, max_concurrent: int, gpus: float, callbacks: list[Any], *,
                stop: Any = None, reuse_actors: bool = False, trainable: Any = None,
                keep_checkpoints: int | None = 2) -> Any:
    """The Tuner of a new sweep: ParetoSearch over the plan's space, the --scheduler, storage and
    failure policy. `run` uses it; benchmarks/search_efficiency.py too (with a `stop` for an epoch
    budget and `reuse_actors`), so both measure the same sweep; benchmarks/driver_scale.py may vary
    `keep_checkpoints` (Tune's `num_to_keep`). Needs `plan.state_dir` to exist."""
    from ray import tune

    if trainable is None:  # benchmarks/driver_scale.py passes a synthetic one
        from trainables.tune import trainable

    from .moasha import MOASHAScheduler
    from .samplers import make_sampler
    from .searcher import ParetoSearch
    from .study_storage import open_study_storage

    args = plan.args
    storage = open_study_storage(plan.state.study_spec())
    searcher = ParetoSearch(plan.space, make_sampler(args.sampler, args.seed, max_concurrent, args.trials, args.scheduler), plan.name, storage,
                            floors=plan.floors, total_trials=args.trials)
    callbacks = list(callbacks)
    scheduler = None
    if args.scheduler == "moasha":
        scheduler = MOASHAScheduler(list(OBJECTIVES), ["max"] * 3, time_attr="epoch",
                                    grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                                    max_t=args.epochs, tie_break=args.tie_break,
                                    violation=plan.floors.violation)  # below the floor: ranked last
        callbacks.append(scheduler.state_callback())
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial or 1.0, "gpu": gpus}),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=args.trials,
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.storage_path, callbacks=callbacks, stop=stop,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints),
            verbose=0 if args.quiet else 1,
        ),
    )


def run(plan: Plan) -> int:
    from mlflow.tracking import MlflowClient
    from ray import tune

    from trainables.tune import trainable

    from .callbacks import NoRetryOnDivergence, NoTensorBoard, ProgressCallback
    from .redact import redact, redact_obj
    from .results import format_front, front_frame, trials_frame, upload, write_tables
    from .searcher import settle_sampled_ahead
    from .study_storage import StateSync
    from .sweep_logging import finish_logging, link_lines
    from .tracking import (
        MLflowSweepCallback,
        get_or_create_experiment,
        start_parent_run,
    )

    args = plan.args
    _connect(plan)
    res = cluster_resources(plan)
    args.cpus_per_trial, gpus, max_concurrent = res.cpus_per_trial, res.gpus_per_trial, res.max_concurrent
    why = device_refusal(plan.space.fixed.get("device"), gpus)
    if why:  # before anything is written; every trial would fail (and be retried) otherwise
        fail(why)
    state = plan.state
    if plan.resume:
        state.pull()  # s3://, gs://: the stored state replaces whatever the local mirror holds
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(plan.tracking_uri)
    if plan.resume:
        experiment_id, parent = plan.stored["experiment_id"], plan.stored["parent_run_id"]
        client.update_run(parent, status="RUNNING")
    else:
        experiment_id = get_or_create_experiment(client, args.experiment, plan.tracking_uri)
        parent = start_parent_run(
            client, experiment_id, plan.name,
            {**{k: v for k, v in plan.record().items() if k != "space"}, "max_concurrent": max_concurrent,
             "gpus_per_trial": gpus, "cpus_per_trial": args.cpus_per_trial, "objectives": ",".join(OBJECTIVES),
             **plan.floors.as_params(), "hv_reference": ",".join(f"{v:g}" for v in plan.floors.reference)},
            {**_version_tags(), "brsearch.floor": plan.floors.describe()},
        )
        # credentials (user:password@ in a URI or path, token=...) never reach params or artifacts
        client.log_dict(parent, redact_obj(plan.space.describe()), "space.json")
        state.write_record(redact_obj({**plan.record(), "experiment_id": experiment_id, "parent_run_id": parent,
                                       **res.record()}))
    print(f"brsearch: sweep {plan.name!r}: {args.trials} trials x {args.epochs} epochs, sampler {_sampler_label(args)}, "
          f"scheduler {args.scheduler}, {max_concurrent} at once ({args.cpus_per_trial:g} CPU, {gpus:g} GPU each), "
          f"from {res.source}\n"
          f"  floor    {plan.floors.describe()} (hypervolume reference; trials below it are infeasible)\n"
          f"  results  {redact(plan.exp_dir)}\n  mlflow   {redact(plan.tracking_uri)} (experiment {args.experiment!r}, parent run {parent})\n"
          f"{link_lines(plan.tracking_uri, experiment_id)}", flush=True)

    wrapped = tune.with_resources(trainable, {"cpu": args.cpus_per_trial, "gpu": gpus})
    if plan.resume:
        tuner = tune.Tuner.restore(plan.exp_dir, trainable=wrapped, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        callbacks = [MLflowSweepCallback(plan.tracking_uri, experiment_id, parent, plan.name, floors=plan.floors),
                     ProgressCallback(args.trials), NoRetryOnDivergence(), NoTensorBoard()]
        if state.remote:
            callbacks.append(StateSync(state))
        tuner = build_tuner(plan, max_concurrent, gpus, callbacks, reuse_actors=args.reuse_actors)
    # Tune forces an experiment-state snapshot whenever a trial has saved num_to_keep checkpoints
    # since the last one, and warns "snapshotting has been triggered multiple times" when that
    # happens twice within 5 s: with epochs of a few seconds, dozens of times per sweep. Measured on
    # a 2-core CPU (docs/benchmarks.md, "Sweep overhead"): ~12 ms per forced snapshot, 0.1-0.3 s per
    # sweep, so the warning is noise here. Set the variable yourself to get it back.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tuner.fit()
    settle_sampled_ahead()
    state.push()

    analysis = tune.ExperimentAnalysis(plan.exp_dir)
    trials = analysis.trials
    df = trials_frame(trials, plan.floors)
    front = front_frame(df)
    out_dir = Path(plan.exp_dir) if plan.local else plan.state_dir
    files = write_tables(out_dir, df, front)
    shown = [str(f) for f in files] if plan.local else upload(files, plan.exp_dir)
    finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    interrupted = finished < args.trials
    # MLflow last, in the background logger: the results above are complete whatever it does
    unsent = finish_logging(
        tracking_uri=plan.tracking_uri, experiment_id=experiment_id, parent_run_id=parent, sweep=plan.name,
        analysis=analysis, trials_df=df, front_df=front, files=files, status="KILLED" if interrupted else "FINISHED",
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus, floors=plan.floors, reference=plan.floors.reference,
        register=args.register,
        patience_s=args.mlflow_wait, replay_first=plan.resume,
        resume_hint=f"python -m search.pareto --name {plan.name} --storage-path {plan.storage_path} --resume-logging")
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    below = int((df["status"] == "completed").sum() - df["feasible"].sum()) if len(df) else 0
    print(f"\nfloor: {plan.floors.describe()}; {below} completed trial(s) below it kept off the front")
    print(f"Pareto front of {plan.name!r} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}):")
    print(format_front(front))
    print(f"\nwrote {', '.join(shown)}")
    print(link_lines(plan.tracking_uri, experiment_id), flush=True)
    if unsent:
        print(unsent, file=sys.stderr, flush=True)
    if interrupted:
        print(f"sweep interrupted after {finished}/{args.trials} trials; continue with: "
              f"python -m search.pareto --name {plan.name} --storage-path {shlex.quote(plan.storage_path)} --resume", file=sys.stderr)
        return 130
    return 0 if counts.get("completed") else 1


def resume_logging(plan: Plan) -> int:
    """`--resume-logging`: send to MLflow what the stored results hold and MLflow lacks (a tracking
    server that was down at the end of the sweep), then finish the parent run. Trains nothing."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from .results import front_frame, trials_frame
    from .sweep_logging import finish_logging, link_lines

    experiment_id, parent = plan.stored["experiment_id"], plan.stored["parent_run_id"]
    analysis = tune.ExperimentAnalysis(plan.exp_dir)
    trials = analysis.trials
    df = trials_frame(trials, plan.floors)
    front = front_frame(df)
    out_dir = Path(plan.exp_dir) if plan.local else plan.state_dir
    files = [out_dir / f"{n}.{s}" for n in ("trials", "pareto") for s in ("parquet", "csv") if (out_dir / f"{n}.{s}").exists()]
    params = MlflowClient(plan.tracking_uri).get_run(parent).data.params
    finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    print(f"brsearch: logging sweep {plan.name!r} to {plan.tracking_uri}: {len(trials)} trials from {plan.exp_dir}", flush=True)
    unsent = finish_logging(
        tracking_uri=plan.tracking_uri, experiment_id=experiment_id, parent_run_id=parent, sweep=plan.name,
        analysis=analysis, trials_df=df, front_df=front, files=files,
        status="FINISHED" if finished >= int(plan.stored.get("trials", plan.args.trials)) else "KILLED",
        cpus_per_trial=float(params.get("cpus_per_trial", plan.args.cpus_per_trial)),
        gpus_per_trial=float(params.get("gpus_per_trial", 0)), floors=plan.floors, reference=plan.floors.reference,
        register=plan.args.register, patience_s=plan.args.mlflow_wait, replay_first=True,
        resume_hint=f"python -m search.pareto --name {plan.name} --storage-path {shlex.quote(plan.storage_path)} --resume-logging")
    if unsent:
        print(unsent, file=sys.stderr, flush=True)
        return 1
    print(f"logged: {len(trials)} trials, the front ({len(front)}) and the summary\n{link_lines(plan.tracking_uri, experiment_id)}")
    return 0


def cluster_resources(plan: Plan) -> Any:
    """Per-trial resources and concurrency from what the cluster can provide (search.resources);
    a resumed sweep asks for what it stored (adopted into the flags by `_adopt_stored`)."""
    import ray

    from .resources import (
        autoscaler_config_path,
        describe_source,
        load_config,
        plan_resources,
    )

    args = plan.args
    path, config = None, None
    if plan.address:
        path = autoscaler_config_path(ray.get_runtime_context().gcs_address, args.cluster_config)
        if path is None and args.cluster_config:
            fail(f"--cluster-config {args.cluster_config}: no such file; accepted: the cluster YAML the autoscaler runs with")
        try:
            config = load_config(path) if path else None
        except (OSError, ValueError) as e:
            fail(f"cluster config {path}: {str(e).splitlines()[0]}; accepted: a Ray cluster YAML (--cluster-config)")
    try:
        return plan_resources(cpus=args.cpus_per_trial, gpus=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                              trials=args.trials, nodes=ray.nodes(), config=config, source=describe_source(path))
    except ValueError as e:
        fail(f"{e}; accepted: --cpus-per-trial/--gpus-per-trial that a node type of the cluster provides")


def _version_tags() -> dict[str, str]:
    import subprocess

    import mlflow
    import optuna
    import ray
    import torch

    tags = {"ray_version": ray.__version__, "optuna_version": optuna.__version__,
            "mlflow_version": mlflow.__version__, "torch_version": torch.__version__}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        if sha:
            tags["git_sha"] = sha
    except Exception:
        pass
    return tags


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = prepare(args)
    except ConfigError as e:
        fail(str(e))
    return resume_logging(plan) if args.resume_logging else run(plan)


if __name__ == "__main__":
    raise SystemExit(main())
