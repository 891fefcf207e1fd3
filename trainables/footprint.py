"""What a trial's model costs where it ships: the bytes of its packed file and its latency in
onnxruntime, reported beside the accuracies so a sweep can optimise them (`--objectives`).

`size_kib` is exact: the length of the file `trainables.export.packed_file` writes for the model
(with no provenance `meta`, which is what `search.pick` writes), divided by 1024. `latency_ms` is
the median wall time of `runs` batch-1 inferences of the exported ONNX model (as `search.export
--onnx` writes it by default: QDQ weights, test-time noise on) in onnxruntime's CPU provider on this
node, after 5 warm-up runs, with `threads` intra-op threads; the interquartile range and the
thread count are reported with it, since a latency without its spread and threads cannot be
compared. Where the exporter merges identical weights (e.g. two layers pruned to all zeros), the QDQ
rewrite cannot name them, and the same graph with float weights is timed instead. The ONNX graph
keeps zeroed channels (they are not cut out), so latency follows the
architecture (depth, width, ensemble), not the channel sparsity.

Pure PyTorch, onnx and onnxruntime: no Ray, Optuna or MLflow.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .config import TrainConfig
from .contract import LATENCY_MS, LATENCY_SPREAD_MS, LATENCY_THREADS, SIZE_KIB

WARMUP_RUNS = 5


def size_kib(state_dict: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, float]:
    from .export import packed_file

    return {SIZE_KIB: len(packed_file(state_dict, cfg)[1]) / 1024.0}


def latency(state_dict: dict[str, torch.Tensor], cfg: TrainConfig, example: torch.Tensor, *,
            threads: int = 1, runs: int = 50) -> dict[str, float]:
    """Median and IQR (ms) of batch-1 onnxruntime inference of the model's deployed ONNX graph.
    `example`: one input of the data's shape (batch 1)."""
    import onnxruntime as ort

    from . import onnx_export as ox
    from .export import model_from_state_dict, packed_file

    header, _ = packed_file(state_dict, cfg)
    model = model_from_state_dict(state_dict, cfg)
    x = example[:1].detach().to("cpu", torch.float32)
    try:
        graph = ox.onnx_bytes(model, x, noise=True, qdq=ox.weight_codes(model, header))
    except RuntimeError:  # the exporter merged identical weights (all-zero layers): time the float-weight graph
        graph = ox.onnx_bytes(model, x, noise=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    feed = {ox.INPUT: x.numpy()}
    for _ in range(WARMUP_RUNS):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {LATENCY_MS: statistics.median(times), LATENCY_SPREAD_MS: q[2] - q[0], LATENCY_THREADS: float(threads)}


def footprint(state_dict: dict[str, torch.Tensor], cfg: TrainConfig, example: torch.Tensor,
              with_latency: bool) -> dict[str, Any]:
    out: dict[str, Any] = size_kib(state_dict, cfg)
    if with_latency:
        out.update(latency(state_dict, cfg, example, threads=cfg.latency_threads, runs=cfg.latency_runs))
    return out
