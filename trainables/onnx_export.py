"""A packed model as ONNX, and onnxruntime's logits for checking it.

Quantized weights are stored QDQ-style by default: int8 codes and the float32 scale feeding a
DequantizeLinear (opset >= 10, which onnxruntime runs everywhere), whose output scale * code is
bit-identical to the projected weight; `qdq=None` writes them as dequantized float32 constants.
int8 holds every width up to 8 bits; ONNX's int4 needs opset 21, which the exporter used here does
not produce, so 1-4 bit codes take a byte each (the packed file is the compact form). BatchNorm is
kept as its own node (TrainingMode.PRESERVE on an eval-mode model), not folded into the preceding
convolution, so every quantized weight stays scale * code. The EnResNet test-time noise is kept by default as ONNX random ops (RandomNormalLike after every
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


def weight_codes(model: nn.Module, header: dict) -> dict[str, tuple[np.ndarray, float]]:
    """state-dict name -> (int8 codes, float32 scale) of every quantized weight of a packed model."""
    from .export import codes_and_scale

    bits = header["quant"]["bits"]
    out = {}
    for i in range(header["arch"]["ensemble"]):
        for name in header["quantized"]:
            key = f"members.{i}.{name}"
            codes, scale = codes_and_scale(model.get_parameter(key), bits)
            out[key] = (codes.numpy().astype(np.int8), scale)
    return out


def _to_qdq(data: bytes, qdq: dict[str, tuple[np.ndarray, float]]) -> bytes:
    """Replace each named float initializer by int8 codes -> DequantizeLinear(codes, scale, 0)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(data)
    inits = {t.name: t for t in m.graph.initializer}
    missing = sorted(set(qdq) - set(inits))
    if missing:
        raise RuntimeError(f"ONNX graph lacks the weights {missing[:3]}")
    nodes = []
    for name, (codes, scale) in qdq.items():
        m.graph.initializer.remove(inits[name])
        m.graph.initializer.extend([
            numpy_helper.from_array(codes, f"{name}.codes"),
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}.scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{name}.zero_point"),
        ])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.codes", f"{name}.scale", f"{name}.zero_point"],
                                      [name], name=f"{name}.dequantize"))
    for i, n in enumerate(nodes):
        m.graph.node.insert(i, n)
    return m.SerializeToString()


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, noise: bool = True,
               qdq: dict[str, tuple[np.ndarray, float]] | None = None) -> bytes:
    """The model as an ONNX graph (opset 17) with dynamic batch, height and width; `qdq`
    (weight_codes) stores those weights as int8 codes + DequantizeLinear."""
    from .export import noise as noise_ctx

    m = copy.deepcopy(model).eval()
    buf = io.BytesIO()
    with noise_ctx(m, noise), warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation; dynamo=True would need onnxscript
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            m, (example,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT],
            training=torch.onnx.TrainingMode.PRESERVE,  # eval mode, but BatchNorm not folded into convs
            output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                                                 OUTPUT: {0: "batch"}},
        )
    return _to_qdq(buf.getvalue(), qdq) if qdq else buf.getvalue()


def write_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, noise: bool = True,
               qdq: dict[str, tuple[np.ndarray, float]] | None = None) -> None:
    data = onnx_bytes(model, example, noise=noise, qdq=qdq)
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


def check_onnx(model: nn.Module, path: str | Path, x: torch.Tensor, *, noise: bool, atol: float = 1e-4,
               qdq: dict[str, tuple[np.ndarray, float]] | None = None) -> list[str]:
    """onnxruntime against PyTorch, noise off, to atol. A stochastic file (noise=True) is checked
    through its noise-off twin built the same way, and must itself run and hold the noise ops."""
    from .export import logits

    want = logits(model, x, noise_on=False).numpy()
    problems = []
    ref = onnx_bytes(model, x, noise=False, qdq=qdq) if noise else Path(path).read_bytes()
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
