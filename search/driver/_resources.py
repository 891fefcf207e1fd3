"""What one trial asks for, and how many trials run at once: from what the cluster CAN provide.

On an autoscaling cluster `ray.cluster_resources()` at driver start is the head alone (workers are
launched on demand), so GPUs per trial and concurrency are derived from the autoscaler's node
types instead: the autoscaling config on the head (the file the running autoscaler was started
with, `~/ray_bootstrap_config.yaml` under `ray up`, or `--cluster-config`). Pending trials that
ask for a GPU are what make the autoscaler launch GPU workers. Without a config (a local run, a
manually started cluster) the nodes Ray has now are what the cluster can provide.
"""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the config on the head


@dataclass(frozen=True)
class NodeType:
    """A kind of node: its resources and how many of it the cluster may have."""

    name: str
    cpus: float
    gpus: float
    max_count: int
    head: bool = False


@dataclass
class Resources:
    """Per trial and at once; stored in sweep.json so `--resume` asks for the same."""

    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int
    source: str  # where the node types came from (printed, stored)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def node_types_from_config(cfg: dict[str, Any], live_head: tuple[float, float] | None = None) -> list[NodeType]:
    """Node types of a cluster-launcher / autoscaling config. A head type with empty `resources`
    ({} = autodetect) takes the live head's (cpus, gpus) when given. The global `max_workers`
    caps the workers of all types together (applied in `capacity`).

    Args:
        cfg: the cluster YAML as a mapping.
        live_head: (CPUs, GPUs) of the running head, for a head type that autodetects.
    """
    types = cfg.get("available_node_types") or {}
    head_type = cfg.get("head_node_type")
    out = []
    for name, t in types.items():
        res = dict(t.get("resources") or {})
        head = name == head_type
        if head and not res and live_head is not None:
            cpus, gpus = live_head
        else:
            cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        count = 1 if head else int(t.get("max_workers", cfg.get("max_workers", 0)) or 0)
        out.append(NodeType(name, cpus, gpus, count, head))
    return out


def _slots(t: NodeType, cpus: float, gpus: float) -> int:
    n = math.floor(t.cpus / cpus + 1e-9) if cpus > 0 else 10**6
    if gpus > 0:
        n = min(n, math.floor(t.gpus / gpus + 1e-9))
    return max(0, n)


def default_per_trial(types: list[NodeType]) -> tuple[float, float]:
    """(cpus, gpus) per trial when the user gave none: one GPU if any node type has one, with the
    CPUs that come with a GPU on the GPU node type (a g5.xlarge: 4 CPU, 1 GPU -> 4 CPU, 1 GPU);
    otherwise one CPU (small CPU trials: the more at once, the better)."""
    gpu_types = [t for t in types if t.gpus >= 1 and t.max_count > 0]
    if not gpu_types:
        return 1.0, 0.0
    t = max(gpu_types, key=lambda t: (t.max_count * t.gpus, t.gpus))
    return max(1.0, math.floor(t.cpus / t.gpus)), 1.0


def capacity(types: list[NodeType], cpus: float, gpus: float, max_workers: int | None = None) -> int:
    """How many trials of (cpus, gpus) fit at once on the largest cluster the node types allow:
    the head's slots plus each worker type's up to its max_workers, the global max_workers
    filled with the roomiest types first.

    Args:
        types: the cluster's node types.
        cpus: CPUs per trial.
        gpus: GPUs per trial.
        max_workers: the config's global worker cap, if any.
    """
    total = sum(_slots(t, cpus, gpus) for t in types if t.head)
    workers = sorted((t for t in types if not t.head), key=lambda t: -_slots(t, cpus, gpus))
    left = max_workers if max_workers is not None else sum(t.max_count for t in workers)
    for t in workers:
        n = min(t.max_count, left)
        total += n * _slots(t, cpus, gpus)
        left -= n
    return total


def live_node_types(nodes: list[dict[str, Any]]) -> list[NodeType]:
    """The nodes Ray has now (ray.nodes()), one 'type' each: what a cluster without an
    autoscaler can provide."""
    out = []
    for n in nodes:
        if not n.get("Alive", True):
            continue
        r = n.get("Resources") or {}
        head = "node:__internal_head__" in r
        out.append(NodeType(n.get("NodeManagerAddress", "node"), float(r.get("CPU", 0)), float(r.get("GPU", 0)), 1, head))
    return out


def autoscaler_config_path(gcs_address: str | None, explicit: str | None = None) -> Path | None:
    """The autoscaling config of the cluster at `gcs_address`: --cluster-config, else the file
    the running autoscaler (monitor.py) on this machine was started with, else `ray up`'s
    ~/ray_bootstrap_config.yaml. None when there is none (no autoscaler)."""
    if explicit:
        return Path(os.path.expanduser(explicit)).resolve()
    port = gcs_address.rsplit(":", 1)[-1] if gcs_address else None
    proc = Path("/proc")
    if proc.is_dir():
        for p in proc.iterdir():
            if not p.name.isdigit():
                continue
            try:
                argv = (p / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if not any(a.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")) for a in argv[:3]):
                continue
            opts = _options(argv)
            if port and opts.get("gcs-address", "").rsplit(":", 1)[-1] != port:
                continue  # another cluster's autoscaler on this machine
            cfg = opts.get("autoscaling-config")
            if cfg:
                path = Path(os.path.expanduser(cfg))
                if not path.is_absolute():
                    try:
                        path = Path(os.readlink(p / "cwd")) / path
                    except OSError:
                        continue
                if path.is_file():
                    return path
    boot = Path(os.path.expanduser(BOOTSTRAP_CONFIG))
    return boot if boot.is_file() else None


def _options(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val = argv[i + 1]
            out[key.replace("_", "-")] = val
    return out


def load_config(path: Path) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a YAML mapping")  # noqa: TRY004  (bad input, reported as such)
    return cfg


@dataclass(frozen=True)
class ResourceRequest:
    """What the user asked for (None: decide from the cluster), and the sweep's trial count."""

    cpus: float | None
    gpus: float | None
    max_concurrent: int | None
    trials: int


def plan_resources(request: ResourceRequest, nodes: list[dict[str, Any]], config: dict[str, Any] | None,
                   source: str) -> Resources:
    """Per-trial resources and concurrency.

    Args:
        request: the flags; an explicit value wins.
        nodes: `ray.nodes()`, what Ray has now (used without an autoscaling config).
        config: the autoscaler's cluster config, whose node types say what the cluster can grow to.
        source: where `config` came from, for the record.
    """
    cpus, gpus, max_concurrent, trials = request.cpus, request.gpus, request.max_concurrent, request.trials
    live_head = next(((float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
                      for n in nodes if "node:__internal_head__" in (n.get("Resources") or {})), None)
    if config is not None and config.get("available_node_types"):
        types = node_types_from_config(config, live_head)
        max_workers = config.get("max_workers")
    else:
        types, max_workers, source = live_node_types(nodes), None, "the nodes Ray has now"
    dc, dg = default_per_trial(types)
    cpus = dc if cpus is None else cpus
    gpus = dg if gpus is None else gpus
    fits = capacity(types, cpus, gpus, max_workers)
    if fits < 1:
        raise ValueError(f"no node of the cluster ({source}) can ever hold a trial of {cpus:g} CPU, {gpus:g} GPU")
    conc = max_concurrent if max_concurrent is not None else max(1, fits)
    return Resources(float(cpus), float(gpus), max(1, min(conc, trials)), source)


def describe_source(path: Path | None) -> str:
    return f"node types of {shlex.quote(str(path))}" if path else "the nodes Ray has now"
