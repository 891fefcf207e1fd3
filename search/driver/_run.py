"""Running a plan: connect to Ray, size the trials to the cluster, start (or restore) the Tune
experiment, and end every sweep the same way, whether it ran, resumed or only replays its logging."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.cliutil import fail
from trainables.config import ConfigError
from trainables.contract import COMPLETED, FRONT_TABLE, TRIALS_TABLE, table_files, trial_dir

from ._cli import Flags
from ._data import place
from ._plan import Plan, device_refusal, prepare
from ._resources import Resources


@dataclass(frozen=True)
class TunerOptions:
    """What the benchmarks vary in `build_tuner` (the sweep itself uses the defaults): an extra
    stopper, actor reuse, another trainable, the checkpoints kept per trial (None: all)."""

    stop: Any = None
    reuse_actors: bool = False
    trainable: Any = None
    keep_checkpoints: int | None = 2


def keep_every_checkpoint() -> Any:
    """Tune's checkpoint policy for a sweep: no `num_to_keep` (a limit makes Tune force an experiment
    snapshot each time a trial saved that many checkpoints since the last: with a checkpoint per
    epoch, a snapshot every few results, docs/benchmarks.md "Driver scale"); the
    CheckpointKeeper callback deletes old checkpoints instead. Tune then keeps a record of every
    checkpoint in its experiment state, so only the path is kept in it, not the result's metrics
    and config (Ray's TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE; result.json keeps every metric):
    else each trial's state would grow by a result per epoch."""
    from ray import tune

    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")
    return tune.CheckpointConfig(num_to_keep=None)


def trial_dirname(trial: Any) -> str:
    return trial_dir(trial.trial_id)


def _trainable(resources: Resources, plan: Plan) -> Any:
    """The trial function with the resources each trial asks Ray for, and where this run reads the
    data (a restored trial's config names where the sweep started)."""
    from ray import tune

    from trainables.tune import trainable

    with_data = tune.with_parameters(trainable, data_at=place(plan.space))
    return tune.with_resources(with_data, {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial})


def _stored_run(plan: Plan) -> Any:
    """The MLflow parent run a stored sweep (--resume, --resume-logging) logs to."""
    from search.tracking import SweepRun

    return SweepRun(plan.tracking_uri, plan.stored["experiment_id"], plan.stored["parent_run_id"], plan.name)


def build_tuner(plan: Plan, resources: Resources, callbacks: list[Any], options: TunerOptions = TunerOptions()) -> Any:
    """The Tuner of a new sweep: ParetoSearch over the plan's space, the --scheduler, storage and
    failure policy. `run` uses it, and the benchmarks too, so both measure the same sweep.
    Needs `plan.location.state_dir` to exist.

    Args:
        plan: the validated sweep.
        resources: CPUs and GPUs per trial and trials at once.
        callbacks: Tune callbacks (MLflow, progress...); MO-ASHA's state callback is added here.
        options: what benchmarks vary; the sweep uses the defaults.
    """
    from ray import tune

    from search.optimizer import MOASHAScheduler, ParetoSearch, make_sampler
    from search.storage import PACED, CheckpointKeeper, open_study_storage

    trainable = options.trainable if options.trainable is not None else _trainable(resources, plan)
    f = plan.flags
    spec = plan.location.study_spec()
    # the sweep's own journal is written at Tune's snapshots (search.storage.SnapshotPacedJournal)
    storage = open_study_storage(spec if f.study_storage else {**spec, PACED: "1"})
    sampler = make_sampler(f.sampler, f.seed, resources.max_concurrent, f.trials, f.scheduler)
    searcher = ParetoSearch(plan.space, sampler, plan.name, storage, objectives=plan.floors.objectives,
                            floors=plan.floors, total_trials=f.trials)
    if plan.resume:  # no Tune snapshot to continue from (`run`): what the killed driver asked stays RUNNING
        n = searcher.reconcile_orphans()
        if n:
            print(f"brsearch: marked {n} Optuna trial(s) the stopped driver had started as FAIL", flush=True)
    if plan.imported is not None:
        from ._warm import seed_study

        seed_study(searcher.study, plan.imported)
    callbacks = list(callbacks)
    if options.keep_checkpoints:  # instead of Tune's num_to_keep, which forces snapshots (search.storage._keeper)
        callbacks.append(CheckpointKeeper(options.keep_checkpoints))
    scheduler = None
    if f.scheduler == "moasha":
        scheduler = MOASHAScheduler(list(plan.floors.objectives), list(plan.floors.directions), grace_period=f.grace_period,
                                    reduction_factor=f.reduction_factor, max_t=f.epochs, tie_break=f.tie_break,
                                    violation=plan.floors.violation)  # below the floor: ranked last
        callbacks.append(scheduler.state_callback())
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=f.trials,
                                    max_concurrent_trials=resources.max_concurrent,
                                    trial_dirname_creator=trial_dirname,
                                    reuse_actors=options.reuse_actors),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.location.storage, callbacks=callbacks, stop=options.stop,
            failure_config=tune.FailureConfig(max_failures=f.max_failures),
            checkpoint_config=keep_every_checkpoint(),
            verbose=0 if f.quiet else 1,
        ),
    )


def run(plan: Plan) -> int:
    """Train the sweep (new, or `--resume`), then end it."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from search.redact import redact, redact_obj
    from search.storage import StateSync
    from search.tracking import (
        MLflowSweepCallback,
        SweepRun,
        get_or_create_experiment,
        link_lines,
        start_parent_run,
        sweep_logger,
    )

    from ._callbacks import NoRetryOnDivergence, NoTensorBoard, ProgressCallback

    f, location = plan.flags, plan.location
    _connect(plan)
    res = cluster_resources(plan)
    why = device_refusal(plan.space.fixed.get("device"), res.gpus_per_trial)
    if why:  # before anything is written; every trial would fail (and be retried) otherwise
        fail(why)
    if plan.resume:
        location.pull_state()  # s3://, gs://: the stored state replaces whatever the local copy holds
    location.state_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(plan.tracking_uri)
    if plan.resume:
        sweep_run = _stored_run(plan)
        logger = sweep_logger(sweep_run)  # queued: a tracking server that is away does not hold up the resume
        logger.call(logger.client.update_run, sweep_run.parent_run_id, "RUNNING", label="parent run resumed")
    else:
        experiment_id = get_or_create_experiment(client, f.experiment, plan.tracking_uri)
        parent = start_parent_run(
            client, experiment_id, plan.name,
            {**{k: v for k, v in plan.record().items() if k != "space"}, "max_concurrent": res.max_concurrent,
             "gpus_per_trial": res.gpus_per_trial, "cpus_per_trial": res.cpus_per_trial, "objectives": ",".join(plan.floors.objectives),
             **plan.floors.as_params(),
             "hv_reference": ",".join("inferred" if v is None else f"{v:g}" for v in plan.floors.fixed_reference)},
            {**_version_tags(), "brsearch.floor": plan.floors.describe()},
        )
        sweep_run = SweepRun(plan.tracking_uri, experiment_id, parent, plan.name)
        # credentials (user:password@ in a URI or path, token=...) never reach params or artifacts
        client.log_dict(parent, redact_obj(plan.space.describe()), "space.json")
        location.write_record(redact_obj({**plan.record(), "experiment_id": experiment_id, "parent_run_id": parent,
                                          **res.record()}))
    print(f"brsearch: sweep {plan.name!r}: {f.trials} trials x {f.epochs} epochs, sampler {plan.sampler_label}, "
          f"scheduler {f.scheduler}, {res.max_concurrent} at once ({res.cpus_per_trial:g} CPU, {res.gpus_per_trial:g} GPU each), "
          f"from {res.source}\n"
          f"  optimise {', '.join(f'{m} ({d})' for m, d in zip(plan.floors.objectives, plan.floors.directions))}"
          f"{f' + {len(plan.imported.trials)} imported trials' if plan.imported else ''}\n"
          f"  bounds   {plan.floors.describe()} (hypervolume reference; trials outside are infeasible)\n"
          f"  results  {redact(location.exp_dir)}\n  mlflow   {redact(plan.tracking_uri)} "
          f"(experiment {f.experiment!r}, parent run {sweep_run.parent_run_id})\n"
          f"{link_lines(plan.tracking_uri, sweep_run.experiment_id)}", flush=True)

    if plan.resume and location.has_tune_snapshot():
        _reconcile_with_snapshot(plan)
        keep_every_checkpoint()  # a sweep started with num_to_keep keeps it (Tune restores its RunConfig)
        tuner = tune.Tuner.restore(location.exp_dir, trainable=_trainable(res, plan), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        if plan.resume:  # Ray's restore would run an experiment of one trial (it drops num_samples)
            print(f"brsearch: --resume {plan.name!r}: the sweep was stopped before Tune's first experiment snapshot; "
                  "its trials start again, under the same parent run and study", flush=True)
        callbacks = [MLflowSweepCallback(sweep_run, floors=plan.floors),
                     ProgressCallback(f.trials), NoRetryOnDivergence(), NoTensorBoard()]
        if location.remote:
            callbacks.append(StateSync(location))
        tuner = build_tuner(plan, res, callbacks, TunerOptions(reuse_actors=f.reuse_actors))
    tuner.fit()
    from search.optimizer import settle_sampled_ahead
    from search.storage import flush_studies

    settle_sampled_ahead()
    flush_studies()  # what the last settling told (Tune's final snapshot wrote the rest)
    if plan.resume:  # a trial Tune ended whose end never reached the restored searcher: Optuna
        _reconcile_with_snapshot(plan, "at the end")  # still has it running, Tune's tables have it ended
    location.push_state()
    return end_sweep(plan, sweep_run, res, trained=True)


def _reconcile_with_snapshot(plan: Plan, when: str = "before the restore") -> None:
    """The study as Tune's snapshot has it (search.optimizer's `reconcile_with_snapshot`): before
    the Tuner is restored, what a kill between the snapshot and the study's write leaves; at the
    end of a resumed sweep, a trial that ended without the searcher hearing of it."""
    import optuna
    from ray.tune import ExperimentAnalysis

    from search.optimizer import reconcile_with_snapshot
    from search.storage import open_study_storage

    try:
        study = optuna.load_study(study_name=plan.name, storage=open_study_storage(plan.location.study_spec()))
    except KeyError:  # never written: the searcher starts it again (ParetoSearch.__setstate__)
        return
    done = reconcile_with_snapshot(study, ExperimentAnalysis(plan.location.exp_dir).trials,
                                   list(plan.floors.objectives), plan.floors)
    if any(done.values()):
        print(f"brsearch: --resume {plan.name!r}: Optuna set to Tune's trials {when} ({done['told']} ended trial(s) "
              f"told, {done['resumed']} running trial(s) taken up)", flush=True)
    plan.location.push_state()


def resume_logging(plan: Plan) -> int:
    """`--resume-logging`: send to MLflow what the stored results hold and MLflow lacks (a tracking
    server that was down at the end of the sweep), then finish the parent run. Trains nothing."""
    from mlflow.tracking import MlflowClient

    sweep_run = _stored_run(plan)
    params = MlflowClient(plan.tracking_uri).get_run(sweep_run.parent_run_id).data.params
    res = Resources(float(params.get("cpus_per_trial", plan.flags.cpus_per_trial or 1.0)),
                    float(params.get("gpus_per_trial", 0)), int(params.get("max_concurrent", 1)), "the stored sweep")
    print(f"brsearch: logging sweep {plan.name!r} to {plan.tracking_uri} from {plan.location.exp_dir}", flush=True)
    return end_sweep(plan, sweep_run, res, trained=False)


def end_sweep(plan: Plan, sweep_run: Any, res: Resources, *, trained: bool) -> int:
    """The one end of a sweep: its tables from the stored trials (written after training; a
    --resume-logging logs the stored ones, which search.evaluate may have extended), then MLflow
    (in the background logger: the tables are complete whatever it does), then the front.

    Exit code: 130 when trials are left for a --resume, else 0 if any trial completed (a
    --resume-logging: 0 when everything was logged, 1 when the server is still away).

    Args:
        plan: the sweep.
        sweep_run: its MLflow parent run.
        res: the resources its trials had (for the summary's CPU and GPU hours).
        trained: False for --resume-logging, which trains nothing.
    """
    from ray import tune

    from search.results import format_front, front_frame, trials_frame, write_tables
    from search.tracking import SweepEnd, finish_logging, link_lines

    location = plan.location
    analysis = tune.ExperimentAnalysis(location.exp_dir)
    trials = analysis.trials
    df = trials_frame(trials, plan.floors, plan.imported.rows if plan.imported else ())
    front = front_frame(df, plan.floors)
    if trained:
        files = write_tables(location.local_dir, df, front)
        shown = location.push(files)
    else:  # the stored tables stay as they are: search.evaluate may have added columns to them
        files = location.fetch(*table_files(TRIALS_TABLE), *table_files(FRONT_TABLE))
        shown = [str(f) for f in files]
    finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    interrupted = finished < int(plan.stored.get("trials", plan.flags.trials))
    end = SweepEnd(analysis, df, front, files, "KILLED" if interrupted else "FINISHED", plan.floors,
                   res.cpus_per_trial, res.gpus_per_trial, plan.flags.register)
    unsent = finish_logging(sweep_run, end, patience_s=plan.flags.mlflow_wait, replay_first=plan.resume,
                            resume_hint=plan.command("--resume-logging"))
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    below = int((df["status"] == COMPLETED).sum() - df["feasible"].sum()) if len(df) else 0
    print(f"\nfloor: {plan.floors.describe()}; {below} completed trial(s) below it kept off the front")
    print(f"Pareto front of {plan.name!r} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}):")
    print(format_front(front, plan.floors))
    print(f"\nwrote {', '.join(shown)}")
    print(link_lines(plan.tracking_uri, sweep_run.experiment_id), flush=True)
    if unsent:
        print(unsent, file=sys.stderr, flush=True)
    if interrupted and trained:
        print(f"sweep interrupted after {finished}/{plan.flags.trials} trials; continue with: {plan.command('--resume')}",
              file=sys.stderr)
        return 130
    if not trained:
        return 1 if unsent else 0
    return 0 if counts.get(COMPLETED) else 1


def _connect(plan: Plan) -> None:
    import ray

    try:
        if plan.address:
            ray.init(address=plan.address, log_to_driver=not plan.flags.quiet)
        else:
            # "local": a new instance even where `ray start` left a cluster to auto-detect
            ray.init(address="local", num_cpus=plan.flags.num_cpus, include_dashboard=False,
                     log_to_driver=not plan.flags.quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        fail(f"cannot reach the Ray cluster at {plan.address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; accepted: a running cluster's address, 'auto' on its head node, or no --address for a local run")


def cluster_resources(plan: Plan) -> Resources:
    """Per-trial resources and concurrency from what the cluster can provide (search.driver's
    resources); a resumed sweep asks for what it stored (adopted into the flags by `prepare`)."""
    import ray

    from ._resources import ResourceRequest, autoscaler_config_path, describe_source, load_config, plan_resources

    f = plan.flags
    path, config = None, None
    if plan.address:
        path = autoscaler_config_path(ray.get_runtime_context().gcs_address, f.cluster_config)
        if path is None and f.cluster_config:
            fail(f"--cluster-config {f.cluster_config}: no such file; accepted: the cluster YAML the autoscaler runs with")
        try:
            config = load_config(path) if path else None
        except (OSError, ValueError) as e:
            fail(f"cluster config {path}: {str(e).splitlines()[0]}; accepted: a Ray cluster YAML (--cluster-config)")
    try:
        request = ResourceRequest(f.cpus_per_trial, f.gpus_per_trial, f.max_concurrent, f.trials)
        return plan_resources(request, ray.nodes(), config, describe_source(path))
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
    """`python -m search.pareto`."""
    flags = Flags.parse(argv)
    try:
        plan = prepare(flags)
    except ConfigError as e:
        fail(str(e))
    return resume_logging(plan) if plan.flags.resume_logging else run(plan)

