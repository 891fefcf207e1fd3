"""What a sweep will run: `prepare` turns the command line into a validated, frozen `Plan` and
writes nothing, so every bad input fails with one line before Ray, MLflow or the storage are
touched. On `--resume` the stored sweep's flags and space are adopted here, once."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from search.front import Floors
from search.optimizer import (
    SAMPLERS,
    SCHEDULERS,
    TIE_BREAKS,
    Space,
    joint_modelling_gap,
    load_space,
    parse_sets,
    resolve_sampler,
    sampler_label,
    scheduler_gap,
)
from search.storage import SweepLocation, is_remote, study_spec_from_flag
from trainables.config import ConfigError, TrainConfig
from trainables.contract import LATENCY_MS, ObjectiveError, parse_objectives
from trainables.fileio import unwritable

from ._cli import Flags
from ._data import data_identity, data_moved, place, same_sweep, sweep_fingerprint
from ._warm import Imported, import_trials

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Plan:
    """Everything validated, nothing written yet."""

    flags: Flags
    name: str
    space: Space
    location: SweepLocation
    tracking_uri: str
    address: str | None
    floors: Floors
    stored: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # sweep.json, on --resume
    data_id: str | None = None  # the data by identity (search.driver._data.data_identity)
    imported: Imported | None = None  # --warm-start: earlier sweeps' finished trials

    @property
    def resume(self) -> bool:
        return self.flags.resume

    @property
    def sampler_label(self) -> str:
        """`auto (gp)`: the name the user gave and what it became for this sweep."""
        return sampler_label(self.flags.sampler, self.flags.trials, self.flags.scheduler)

    def record(self) -> dict[str, Any]:
        """What sweep.json keeps of the plan (and the parent run's params)."""
        f = self.flags
        return {
            "name": self.name, "space": self.space.describe(), "fingerprint": sweep_fingerprint(self.space.describe()),
            "data_identity": self.data_id, "data_place": place(self.space),
            "sampler": f.sampler, "scheduler": f.scheduler, "seed": f.seed, "trials": f.trials,
            "epochs": f.epochs, "dataset": f.dataset, "storage_path": self.location.storage,
            "tracking_uri": self.tracking_uri, "experiment": f.experiment,
            "grace_period": f.grace_period, "reduction_factor": f.reduction_factor,
            "tie_break": f.tie_break, "min_clean_acc": f.min_clean_acc, "min_robust_acc": f.min_robust_acc,
            "objectives": list(self.floors.objectives), "max_size_kib": f.max_size_kib,
            "max_latency_ms": f.max_latency_ms, "warm_start": list(f.warm_start),
            "reuse_actors": f.reuse_actors, "register": f.register,
            "study_storage": f.study_storage, "study_spec": self.location.study_spec(),
        }

    def command(self, flag: str) -> str:
        """The command line that continues this sweep with `flag` (--resume, --resume-logging)."""
        import shlex

        return f"python -m search.pareto --name {self.name} --storage-path {shlex.quote(self.location.storage)} {flag}"


def _check_flags(f: Flags) -> None:
    """The checks that need nothing but the flags: before anything is imported or read."""
    if f.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {f.scheduler!r} is unknown; accepted: {', '.join(SCHEDULERS)}")
    if f.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {f.sampler!r} is unknown; accepted: {', '.join(SAMPLERS)}")
    for flag in ("trials", "epochs", "max_concurrent", "grace_period"):
        v = getattr(f, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {v}; accepted: an integer >= 1")
    if f.tie_break not in TIE_BREAKS:
        raise ConfigError(f"--tie-break {f.tie_break!r} is unknown; accepted: {', '.join(TIE_BREAKS)}")
    for flag in ("min_clean_acc", "min_robust_acc"):
        v = getattr(f, flag)
        if v is not None and not 0.0 <= v < 1.0:
            raise ConfigError(f"--{flag.replace('_', '-')} {v}; accepted: a number in [0, 1)")
    try:
        objectives, _ = parse_objectives(f.objectives)
    except ObjectiveError as e:
        raise ConfigError(f"--objectives: {e}") from None
    for flag in ("max_size_kib", "max_latency_ms"):
        v = getattr(f, flag)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"--{flag.replace('_', '-')} {v}; accepted: a number > 0")
    if LATENCY_MS in objectives or f.max_latency_ms is not None:
        from trainables.onnx_export import available

        missing = available()
        if missing:
            raise ConfigError(f"{'--objectives ' + LATENCY_MS if LATENCY_MS in objectives else '--max-latency-ms'}: {missing}")
    if f.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor {f.reduction_factor}; accepted: a number > 1")
    if (f.cpus_per_trial is not None and f.cpus_per_trial <= 0) or (f.gpus_per_trial is not None and f.gpus_per_trial < 0):
        raise ConfigError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if f.max_failures < 0:
        raise ConfigError(f"--max-failures {f.max_failures}; accepted: an integer >= 0")
    if f.resume_logging and not f.name:
        raise ConfigError("--resume-logging needs --name NAME of the sweep to log")
    if f.mlflow_wait < 0:
        raise ConfigError(f"--mlflow-wait {f.mlflow_wait}; accepted: seconds >= 0")
    if f.register is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$", f.register):
        raise ConfigError(f"--register {f.register!r}; accepted: letters, digits, '_', '-', '.'")
    if f.resume and not f.name:
        raise ConfigError("--resume needs --name NAME of the sweep to continue")
    if f.name is not None and not NAME_RE.match(f.name):
        raise ConfigError(f"--name {f.name!r}; accepted: letters, digits, '_', '-', '.' (up to 100)")
    if f.study_storage:
        try:
            study_spec_from_flag(f.study_storage)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def prepare(flags: Flags) -> Plan:
    """All the checks, none of the writes; raises ConfigError with a one-line message. The cheap
    checks come first, before torch, Ray and MLflow are imported (seconds), so a typo fails fast.

    Args:
        flags: the parsed command line (`Flags.parse`).
    """
    if flags.resume_logging:  # the stored sweep, checked as for --resume
        flags = dataclasses.replace(flags, resume=True)
    _check_flags(flags)
    name = flags.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    flags = dataclasses.replace(flags, name=name)
    stored_space = None
    if flags.resume:
        flags, stored_space = adopt_stored(flags)

    space = stored_space if stored_space is not None else _space_of(flags)  # a --resume without --space/--set/...: the sweep's own
    space.validate()
    if flags.gpus_per_trial is not None:  # else checked in run(), once the cluster's GPUs are known
        why = device_refusal(space.fixed.get("device"), flags.gpus_per_trial)
        if why:
            raise ConfigError(why)
    sampler = resolve_sampler(flags.sampler, flags.trials, flags.scheduler)
    for gap in (joint_modelling_gap(sampler, space), scheduler_gap(sampler, flags.scheduler)):
        if gap:
            print(gap, file=sys.stderr, flush=True)
    floors = Floors.for_sweep(str(space.fixed.get("dataset", flags.dataset)), flags.min_clean_acc, flags.min_robust_acc,
                              max_size_kib=flags.max_size_kib, max_latency_ms=flags.max_latency_ms,
                              objectives=parse_objectives(flags.objectives)[0])
    address = flags.address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":  # on a cluster, each trial checks its data where it runs
        from trainables.data import check_available

        check_available(TrainConfig.from_flat(space.fixed))

    location = _location(flags, name)
    tracking_uri = _tracking_uri(flags.tracking_uri, resuming=flags.resume and not flags.resume_logging)
    plan = Plan(flags, name, space, location, tracking_uri, address, floors,
                data_id=data_identity(str(space.fixed.get("dataset", flags.dataset))))
    if flags.resume:
        plan = _check_resumable(plan)
        line = data_moved(dict(plan.stored.get("data_place") or {}), place(space))
        if line:
            print(f"brsearch: --resume {name}: the data moved ({line}); the same data by identity, read from the new place",
                  file=sys.stderr, flush=True)
    elif location.exists():
        from search.redact import redact

        raise ConfigError(f"sweep {name!r} already exists under {redact(location.storage)}; accepted: --resume to continue it, or another --name")
    if flags.warm_start:  # reads the earlier sweeps only; refuses a conflicting one here
        imported = import_trials(flags.storage_path, flags.warm_start, space, floors, name)
        for line in imported.notes:
            print(line, file=sys.stderr, flush=True)
        plan = dataclasses.replace(plan, imported=imported)
    # last, as it may wait a few seconds: ray.init on a dead address retries for minutes
    hp = _host_port(address) if address and address not in ("auto", "local") else None
    why = hp and _unreachable(*hp)
    if why:
        from search.redact import redact

        raise ConfigError(f"{'--address' if flags.address else 'RAY_ADDRESS'} {redact(address)}: cannot reach the Ray cluster at {hp[0]}:{hp[1]} ({why}); accepted: a running cluster's address (HEAD:6379, see `ray status` on the head), 'auto' on its head node, or no --address (and no RAY_ADDRESS) for a local run")
    return plan


def _place_of(flags: Flags) -> dict[str, Any]:
    """PLACE_FLAGS as the space pins them (the data root absolute)."""
    return {"data_root": str(Path(os.path.expanduser(flags.data_root)).resolve()), "download": flags.download}


def _space_of(flags: Flags) -> Space:
    """The space the flags name, with the data flags and --set pinned."""
    base: dict[str, Any] = {"dataset": flags.dataset, "epochs": flags.epochs, **_place_of(flags)}
    if flags.dataset.startswith("folder:"):
        base["dataset"] = "folder:" + str(Path(os.path.expanduser(flags.dataset[7:])).resolve())
    for k in ("subset_train", "subset_test"):
        if getattr(flags, k) is not None:
            base[k] = getattr(flags, k)
    if LATENCY_MS in parse_objectives(flags.objectives)[0] or flags.max_latency_ms is not None:
        base["latency"] = "every"  # MO-ASHA's rungs and the floors read it on every report
    space = load_space(flags.space or ("digits" if flags.dataset == "digits" else "paper"))
    return space.pin({**base, **parse_sets(list(flags.set))})


def _location(flags: Flags, name: str) -> SweepLocation:
    storage = flags.storage_path
    if not is_remote(storage):
        location = SweepLocation(storage, name, flags.study_storage)
        why = unwritable(Path(location.storage))
        if why:
            raise ConfigError(f"--storage-path {storage}: not writable: {why}; accepted: a writable directory or an s3://, gs:// URI")
        return location
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(storage)
    except Exception as e:
        raise ConfigError(f"--storage-path {storage}: {str(e).splitlines()[0]}") from None
    return SweepLocation(storage, name, flags.study_storage)


def _tracking_uri(flag: str, resuming: bool = False) -> str:
    """The absolute tracking URI, checked. A new sweep refuses a server it cannot reach (MLflow's
    client would retry for minutes); a --resume goes on with one line, its logging queued until
    the server answers (search.tracking), so an outage never stops a resume."""
    from search.redact import redact
    from search.tracking import absolute_tracking_uri

    uri = absolute_tracking_uri(flag)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        why = unwritable(db.parent) or (None if not db.exists() or os.access(db, os.W_OK) else "read-only file")
        if why:
            raise ConfigError(f"--tracking-uri {flag}: {db} is not writable: {why}; accepted: a writable sqlite path or an http(s):// server")
    elif not uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql")):
        raise ConfigError(f"--tracking-uri {flag}: unsupported; accepted: sqlite:///PATH, http(s)://HOST:PORT or a database URI")
    elif uri.startswith(("http://", "https://")):  # MLflow's client retries for minutes
        hp = _host_port(uri, 443 if uri.startswith("https") else 80)
        why = hp and _unreachable(*hp)
        if why and resuming:
            print(f"brsearch: --tracking-uri {redact(flag)}: cannot reach {hp[0]}:{hp[1]} now ({why}); resuming, "
                  f"the logging waits for the server", file=sys.stderr, flush=True)
        elif why:
            raise ConfigError(f"--tracking-uri {redact(flag)}: cannot reach {hp[0]}:{hp[1]} ({why}); accepted: a running MLflow server (mlflow server --host 127.0.0.1 ...), or a sqlite:///PATH")
    return uri


def _check_resumable(plan: Plan) -> Plan:
    from ray.tune import Tuner

    from search.redact import redact

    stored = plan.location.read_record()
    if stored is None or not Tuner.can_restore(plan.location.exp_dir):
        raise ConfigError(f"--resume: no sweep named {plan.name!r} under {redact(plan.location.storage)}; accepted: the --name (and --storage-path) of an earlier sweep")
    if not same_sweep(stored, plan.space):
        raise ConfigError(f"--resume {plan.name}: the space or pinned values differ from the stored sweep's; accepted: leave out --space/--set/--dataset/--epochs/--subset-* to reuse the stored ones, repeat them exactly, or a new --name")
    was = stored.get("data_identity")
    if was and plan.data_id and was != plan.data_id:
        where = redact(str(place(plan.space).get("dataset")))
        raise ConfigError(f"--resume {plan.name}: the data at {where} are not the stored sweep's (another listing of "
                          f"train/ and test/); accepted: the folder the sweep was started with, wherever it now sits, or a new --name")
    return dataclasses.replace(plan, stored=MappingProxyType(dict(stored)))


# flags that define a sweep: `--name X --resume` takes them from the stored sweep.json unless given
RESUMED_FLAGS = ("trials", "epochs", "dataset", "sampler", "scheduler", "seed", "grace_period", "tie_break",
                 "min_clean_acc", "min_robust_acc", "objectives", "max_size_kib", "max_latency_ms", "warm_start",
                 "reduction_factor", "experiment", "tracking_uri", "register", "study_storage",
                 "cpus_per_trial", "gpus_per_trial", "max_concurrent")
FIXED_ON_RESUME = ("trials", "sampler", "scheduler", "seed", "grace_period", "reduction_factor", "experiment",
                   "tie_break", "min_clean_acc", "min_robust_acc", "objectives", "max_size_kib", "max_latency_ms",
                   "max_concurrent", "study_storage")
SPACE_FLAGS = ("space", "set", "dataset", "subset_train", "subset_test", "epochs")
PLACE_FLAGS = ("data_root", "download")  # where the data sits: given on --resume, they move the stored sweep's


def adopt_stored(flags: Flags) -> tuple[Flags, Space | None]:
    """`--name X --resume` (what an interrupted sweep prints) continues the sweep as it was started:
    every flag of RESUMED_FLAGS left at its default takes the stored value, and with none of
    SPACE_FLAGS given the stored space (pinned values included) is used, with the PLACE_FLAGS
    given (the data now sits elsewhere) pinned over the stored place. Returns the flags and
    that space, or None when the space is to be built from the flags (and checked against the
    stored fingerprint).

    Args:
        flags: the command line of `--resume` (with `name` set).
    """
    name = str(flags.name)
    try:
        stored = SweepLocation(flags.storage_path, name).read_record()
    except (OSError, ValueError, TypeError):  # a bad URI (pyarrow raises these): prepare() says why
        return flags, None
    if stored is None:
        return flags, None  # prepare() says there is no such sweep
    explicit_space = any(flags.given(k) for k in SPACE_FLAGS)
    for k in RESUMED_FLAGS:  # in order: trials before max_concurrent, which is stored capped at it
        v = stored.get(k)
        if v is None or "***" in str(v):  # not stored, or redacted
            continue
        if k == "warm_start":
            v = tuple(v)
        if k == "objectives":  # stored as names; compared by names, whatever spelling was given
            v = ",".join(v)
            try:
                flags = dataclasses.replace(flags, objectives=",".join(parse_objectives(flags.objectives)[0]))
            except ObjectiveError:
                pass  # check_flags says why
        if not flags.given(k):
            flags = dataclasses.replace(flags, **{k: v})
        elif k in FIXED_ON_RESUME and getattr(flags, k) != v and not (
                k == "max_concurrent" and min(flags.max_concurrent, flags.trials) == v):  # stored: capped at --trials
            # Tuner.restore keeps the stored trial count, searcher and scheduler: a new value
            # would be ignored while the sweep reported it, so refuse it
            flag = "--" + k.replace("_", "-")
            raise ConfigError(f"--resume {name}: {flag} {getattr(flags, k)} differs from the stored sweep's {v}; "
                              f"accepted: {flag} {v}, or leave {flag} out (a resumed sweep keeps it)")
    desc = stored.get("space")
    if explicit_space or not isinstance(desc, dict):
        return flags, None
    if "***" in json.dumps(desc.get("fixed") or {}):  # sweep.json keeps no credentials
        raise ConfigError(f"--resume {name}: the stored space has values with credentials, which sweep.json does not "
                          f"keep; accepted: the sweep's --space/--set/--dataset/--data-root/--epochs/--subset-* again")
    if desc.get("define_by_run"):  # a space(trial) function: load it again; the fingerprint catches edits
        loaded = load_space(desc["name"])
        space = Space(desc["name"], {}, dict(desc.get("fixed") or {}), loaded.func, loaded.source)
    else:
        space = Space(desc["name"], dict(desc.get("params") or {}), dict(desc.get("fixed") or {}))
    return flags, space.pin({k: v for k, v in _place_of(flags).items() if flags.given(k)})


def _host_port(address: str, default_port: int | None = None) -> tuple[str, int] | None:
    """host, port of HOST:PORT, ray://HOST:PORT or http(s)://[user@]HOST[:PORT]/...; None if none."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if sep and port.isdigit() and host:
        return host.strip("[]"), int(port)
    if default_port and rest and ":" not in rest.strip("[]"):
        return rest.strip("[]"), default_port
    return None


def _unreachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__




def device_refusal(device: Any, gpus: float) -> str | None:
    """Why a pinned `device` cannot work with `gpus` GPUs per trial, or None. A trial sees only
    the GPUs Ray gives it (a fraction is one device), as trainables.tune.trial_device maps them.

    Args:
        device: the space's pinned `device` value (any type; only `cuda...` strings are
            checked).
        gpus: GPUs per trial.
    """
    if not isinstance(device, str) or not device.startswith("cuda"):
        return None
    if gpus <= 0:
        return (f"--set device={device} but trials get no GPU (--gpus-per-trial {gpus:g}, or a cluster "
                f"without GPUs); accepted: device=auto or cpu, or --gpus-per-trial > 0 on a cluster with GPUs")
    have = max(1, int(gpus))
    index = device.split(":", 1)[1] if ":" in device else "0"
    if not index.isdigit() or int(index) >= have:
        return (f"--set device={device} but each trial has {have} GPU(s) (--gpus-per-trial {gpus:g}); "
                f"accepted: device=cuda (the trial's own GPU) or cuda:0 to cuda:{have - 1}")
    return None
