"""The training device: checking a requested device, its RNG state, determinism and precision.

Kept apart from the loop so the CLI can reject a bad `--device` before anything is built or
written, and so a checkpoint carries the random state of the device that trained it and of no
other (a CPU trial on a GPU node must not save, or later demand, GPU generator states).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .config import PRECISIONS, ConfigError

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def check_device(name: str, cuda_count: int | None = None) -> None:
    """Raise ConfigError (one line) unless `name` names a device this process can use.

    `cuda_count` is the number of visible CUDA devices (default: ask torch); tests pass it to
    check the out-of-range branch on a machine without a GPU."""
    if name in ("auto", "cpu"):
        return
    m = _CUDA_RE.match(name)
    if not m:
        raise ConfigError(f"device={name!r}; accepted: auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        raise ConfigError(f"device={name!r} but this machine has no usable CUDA device; accepted: auto or cpu")
    if m.group(1) is not None and int(m.group(1)) >= count:
        raise ConfigError(
            f"device={name!r} but only {count} CUDA device(s) are visible; accepted: cuda:0 to cuda:{count - 1}"
        )


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 only where the device has it; fp16 autocast on CUDA or CPU."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; accepted: {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16; accepted: fp16 or fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the model's forward passes; a no-op at fp32 and on devices without autocast
    (the `meta` stand-in device of the tests)."""
    if precision == "fp32" or not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Turn autocast off inside (BR projections, penalty, attack steps: arithmetic that must
    stay fp32); a no-op where autocast does not exist."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def set_deterministic(on: bool, device: torch.device) -> None:
    """on: cuDNN deterministic algorithms, no autotuning, deterministic kernels where torch has
    them (warn otherwise). off: cuDNN autotuning on CUDA (fixed shapes: it pays off)."""
    if on:
        # cuBLAS needs a fixed workspace for reproducible results; only read at CUDA start-up
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = device.type == "cuda"
        torch.use_deterministic_algorithms(False)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (which seeds every CUDA device's generator too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The host generators and, for a CUDA run, the training device's generator only."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if device.type == "cuda":
        state["device"] = {"type": "cuda", "state": torch.cuda.get_rng_state(device)}
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what rng_state saved. The device generator goes to the device this run trains
    on (a resumed trial may get another GPU index); a CUDA state is dropped on a CPU resume.
    Checkpoints of older versions hold `cuda`: a list, one state per visible GPU: the first."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type != "cuda":
        return
    dev_state = state.get("device")
    if dev_state is not None and dev_state.get("type") == "cuda":
        torch.cuda.set_rng_state(dev_state["state"], device)
    elif state.get("cuda"):
        torch.cuda.set_rng_state(state["cuda"][0], device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
