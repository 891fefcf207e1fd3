"""A packed model as ONNX, and onnxruntime's logits for checking it.

The weights become float32 constants equal to scale * code (the dequantized codes), so any ONNX
runtime runs the model; the low-bit form is the packed file's job (trainables.export). The
EnResNet test-time noise is kept by default as ONNX random ops (RandomNormalLike after every
residual addition, scaled by the tensor's std as in PyTorch), so the exported model is as
stochastic as the trained one; `noise=False` exports the deterministic model (noise coefficient 0).

Uses torch's TorchScript-based exporter (`dynamo=False`), which needs only the `onnx` package;
onnx and onnxruntime are the optional extra `pip install -e '.[export]'`.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .fileio import atomic_path

OPSET = 17
INPUT, OUTPUT = "input", "logits"


def available() -> str | None:
    """None if onnx and onnxruntime import, else what is missing (one line)."""
    missing = []
    for mod in ("onnx", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return f"{' and '.join(missing)} not installed; accepted: pip install -e '.[export]'" if missing else None


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, noise: bool = True) -> bytes:
    """The model as an ONNX graph (opset 17) with dynamic batch, height and width."""
    from .export import noise as noise_ctx

    m = copy.deepcopy(model).eval()
    buf = io.BytesIO()
    with noise_ctx(m, noise), warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation; dynamo=True would need onnxscript
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            m, (example,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                                                 OUTPUT: {0: "batch"}},
        )
    return buf.getvalue()


def write_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, noise: bool = True) -> None:
    data = onnx_bytes(model, example, noise=noise)
    import onnx

    onnx.checker.check_model(onnx.load_from_string(data))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def ort_logits(model: bytes | str | Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT], {INPUT: x.numpy()})[0]


def random_ops(model: bytes | str | Path) -> int:
    """How many random ops the graph holds (the test-time noise)."""
    import onnx

    m = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    return sum(n.op_type.startswith("Random") for n in m.graph.node)


def check_onnx(model: nn.Module, path: str | Path, x: torch.Tensor, *, noise: bool, atol: float = 1e-4) -> list[str]:
    """onnxruntime against PyTorch, noise off, to atol. A stochastic file (noise=True) is checked
    through its noise-off twin built the same way, and must itself run and hold the noise ops."""
    from .export import logits

    want = logits(model, x, noise_on=False).numpy()
    problems = []
    ref = onnx_bytes(model, x, noise=False) if noise else Path(path).read_bytes()
    got = ort_logits(ref, x)
    err = float(np.abs(got - want).max())
    if not err <= atol:
        problems.append(f"onnxruntime logits differ from PyTorch's by {err:.3g} (> {atol:g}, noise off)")
    if noise:
        n_blocks = sum(1 for m in model.modules() if type(m).__name__ == "NoiseInjection" and m.coef)
        out = ort_logits(Path(path), x)
        if random_ops(Path(path)) < n_blocks or not np.isfinite(out).all():
            problems.append(f"{path}: expected {n_blocks} random noise ops and finite logits")
    return problems
