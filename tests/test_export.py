"""Packed low-bit export (trainables.export), ONNX (trainables.onnx_export) and the
`python -m search.export` CLI.

Round trips write real quantized models (quantize_ + export_state_dict, as the training loop
does) and read them back; the CLI runs on a real 1-trial sweep (real local Ray, in a subprocess)
and on `trainables.train` runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _mlflow_store import mlflow_uri

from trainables import export as ex
from trainables.config import QuantConfig, TrainConfig
from trainables.metrics import structure_metrics
from trainables.models import build_model
from trainables.quant import export_state_dict, project_multibit, quantize_

ROOT = Path(__file__).resolve().parents[1]
# (bits, ternary_mode, lloyd_iters): every width the format stores, both ternary rules
WIDTHS = [(1, "twn0.7", 1), (2, "twn0.7", 1), (2, "exact", 1), (3, "twn0.7", 1), (4, "twn0.7", 1),
          (4, "twn0.7", 3), (5, "twn0.7", 2), (8, "twn0.7", 1), (32, "twn0.7", 1)]


def trained_like(bits: int, mode: str = "twn0.7", iters: int = 1, *, depth: int = 8, width: int = 4,
                 ensemble: int = 2, in_channels: int = 1, shortcut: bool = False, fc: bool = False,
                 zero_filters: bool = True) -> tuple[TrainConfig, dict, torch.nn.Module]:
    """A quantized model as the loop leaves it: BN statistics moved off their defaults, one
    whole zero filter and one stray exact zero (group sparsity), then export_state_dict."""
    torch.manual_seed(bits * 10 + iters)
    cfg = TrainConfig(depth=depth, width=width, ensemble=ensemble, noise=0.1)
    cfg.quant = QuantConfig(bits=bits, ternary_mode=mode, lloyd_iters=iters, quantize_shortcut=shortcut,
                            quantize_fc=fc)
    model = build_model(depth, width, in_channels, 10, ensemble, 0.1)
    br = quantize_(model, cfg.quant)
    with torch.no_grad():
        if zero_filters:
            w = br.float_weights()[1]
            w[0].zero_()
            w[1, 0, 0, 0] = 0.0
        model.train()
        for _ in range(3):
            model(torch.rand(16, in_channels, 8, 8))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    return cfg, export_state_dict(model, br), model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and lose a lot on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("bits,mode,iters", WIDTHS)
def test_round_trip_every_bit_width(tmp_path, bits, mode, iters):
    cfg, sd, model = trained_like(bits, mode, iters)
    path = tmp_path / "m.brpk"
    header = ex.write_packed(sd, cfg, path, image_size=8)
    ref = ex.model_from_state_dict(sd, cfg)
    packed = ex.load_packed(path)
    # every tensor decodes bit for bit
    got = packed.model.state_dict()
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], v), k
    # the reference is the trained quantized model itself (parametrized, quantized mode)
    x = ex.example_input(header, n=4)
    with model.binary_relax.quantized():
        assert torch.equal(ex.logits(model, x, noise_on=False), ex.logits(ref, x, noise_on=False))
    # logits equal with the noise off and on (same seed), weights decode, size bound
    assert ex.check_packed(path, ref) == []
    # size as trainables.metrics counts it, and the file within 10 % + 16 KiB of it
    assert header["size_bits"] == structure_metrics(model, model.binary_relax)["size_bits"]
    assert path.stat().st_size <= ex.size_bound(header["size_bits"])
    if bits <= 8:
        K = ex.levels(bits)
        q = [v for k, v in sd.items() if k.endswith("conv2.weight")]
        codes = [ex.codes_and_scale(t, bits)[0] for t in q]
        assert all(int(c.abs().max()) <= K for c in codes)


def test_flags_quantize_shortcut_and_fc(tmp_path):
    cfg, sd, _ = trained_like(2, shortcut=True, fc=True)
    h = ex.write_packed(sd, cfg, tmp_path / "m.brpk")
    assert "fc.weight" in h["quantized"] and "blocks.1.shortcut.weight" in h["quantized"]
    assert ex.check_packed(tmp_path / "m.brpk", ex.model_from_state_dict(sd, cfg)) == []


def test_packing_order_and_density():
    # LSB first: code i sits in bits [i*b, (i+1)*b); 8, 4, 2 codes per byte at 1, 2, 4 bits
    assert ex.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 1]), 1) == bytes([0b10001101])
    assert ex.pack_bits(np.array([0, 1, 2, 1]), 2) == bytes([0b01100100])
    assert ex.pack_bits(np.array([3, 12]), 4) == bytes([0xC3])
    rng = np.random.default_rng(0)
    for b in range(1, 9):
        v = rng.integers(0, 2 ** b, 1001).astype(np.uint8)
        buf = ex.pack_bits(v, b)
        assert len(buf) == ex.packed_nbytes(1001, b) == (1001 * b + 7) // 8
        assert np.array_equal(ex.unpack_bits(buf, 1001, b), v)


def test_codes_recovered_exactly_from_any_projection():
    """Scale recovery from proj(w) alone, over odd level sets and magnitudes (1e-30..1e30)."""
    g = torch.Generator().manual_seed(0)
    for i in range(150):
        bits = 3 + i % 6
        w = torch.randn(40, generator=g) * 10.0 ** float(torch.randint(-30, 30, (1,), generator=g))
        if i % 3 == 0:
            w = w[w.abs() > w.abs().median()]  # no small levels: the smallest level is not 1
        q = project_multibit(w, bits, 1 + i % 4)
        codes, s = ex.codes_and_scale(q, bits)
        assert torch.equal(codes.float() * torch.tensor(s, dtype=torch.float32), q), (i, bits)
        assert int(codes.abs().max()) <= ex.levels(bits)


def test_unprojected_weights_are_refused(tmp_path):
    cfg, sd, _ = trained_like(4)
    sd["members.0.blocks.0.conv1.weight"] = torch.randn_like(sd["members.0.blocks.0.conv1.weight"])
    with pytest.raises(ex.ExportError, match="blocks.0.conv1.weight.*integer levels"):
        ex.write_packed(sd, cfg, tmp_path / "m.brpk")
    assert not (tmp_path / "m.brpk").exists()


def test_check_catches_a_wrong_model_and_a_corrupt_file(tmp_path):
    cfg, sd, _ = trained_like(2)
    path = tmp_path / "m.brpk"
    ex.write_packed(sd, cfg, path)
    other = ex.model_from_state_dict(sd, cfg)
    with torch.no_grad():
        other.members[1].bn.running_mean.add_(0.01)
    problems = ex.check_packed(path, other)
    assert problems and "logits differ" in problems[0]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ex.ExportError, match="corrupt"):
        ex.load_packed(path)


def test_resnet20_ternary_size():
    """The issue's example: a ternary ResNet20 (float model.pt ~1 MB) packs to ~size_bits/8."""
    cfg, sd, _ = trained_like(2, depth=20, width=16, ensemble=1, in_channels=3, zero_filters=False)
    import io
    import tempfile

    buf = io.BytesIO()
    torch.save(sd, buf)
    with tempfile.TemporaryDirectory() as d:
        h = ex.write_packed(sd, cfg, Path(d) / "m.brpk")
        size = (Path(d) / "m.brpk").stat().st_size
    print(f"ResNet20 ternary: model.pt {len(buf.getvalue())} B, packed {size} B, size_bits/8 {h['size_bits'] / 8:.0f} B")
    assert size <= ex.size_bound(h["size_bits"])
    assert size < len(buf.getvalue()) / 8


# --- ONNX --------------------------------------------------------------------------------


def test_onnx_matches_pytorch_and_keeps_the_noise(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from trainables import onnx_export as ox

    cfg, sd, _ = trained_like(2)
    ex.write_packed(sd, cfg, tmp_path / "m.brpk", image_size=8)
    packed = ex.load_packed(tmp_path / "m.brpk")
    x = ex.example_input(packed.header, n=5)
    # deterministic export: onnxruntime == PyTorch (noise off) to 1e-4, any batch size
    ox.write_onnx(packed.model, x, tmp_path / "det.onnx", noise=False)
    for xb in (x, ex.example_input(packed.header, n=2, seed=9)):
        got = ox.ort_logits(tmp_path / "det.onnx", xb)
        want = ex.logits(packed.model, xb, noise_on=False).numpy()
        assert np.abs(got - want).max() <= 1e-4
    assert ox.random_ops(tmp_path / "det.onnx") == 0
    assert ox.check_onnx(packed.model, tmp_path / "det.onnx", x, noise=False) == []
    # QDQ: every quantized weight as int8 codes + DequantizeLinear, BatchNorm not folded into them
    import onnx
    from onnx import numpy_helper

    qdq = ox.weight_codes(packed.model, packed.header)
    ox.write_onnx(packed.model, x, tmp_path / "qdq.onnx", noise=False, qdq=qdq)
    g = onnx.load(str(tmp_path / "qdq.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("DequantizeLinear") == len(packed.header["quantized"]) * cfg.ensemble == len(qdq)
    assert ops.count("BatchNormalization") == 7 * cfg.ensemble
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for name, (_codes, scale) in qdq.items():
        assert name not in inits and inits[f"{name}.codes"].dtype == np.int8
        assert np.array_equal(inits[f"{name}.codes"] * np.float32(scale), packed.model.get_parameter(name).detach().numpy())
    got = ox.ort_logits(tmp_path / "qdq.onnx", x)
    assert np.abs(got - ex.logits(packed.model, x, noise_on=False).numpy()).max() <= 1e-4
    assert (tmp_path / "qdq.onnx").stat().st_size < (tmp_path / "det.onnx").stat().st_size
    # default export: stochastic like the trained model (one noise op per residual block)
    ox.write_onnx(packed.model, x, tmp_path / "noisy.onnx", qdq=qdq)
    assert ox.random_ops(tmp_path / "noisy.onnx") == 3 * cfg.ensemble
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "noisy.onnx"), providers=["CPUExecutionProvider"])
    a, b = (sess.run(None, {"input": x.numpy()})[0] for _ in range(2))
    assert not np.array_equal(a, b) and np.isfinite(a).all()
    assert ox.check_onnx(packed.model, tmp_path / "noisy.onnx", x, noise=True, qdq=qdq) == []
    # and the check can fail
    with torch.no_grad():
        packed.model.members[0].fc.bias.add_(1e-3)
    assert ox.check_onnx(packed.model, tmp_path / "det.onnx", x, noise=False)


# --- the CLI -----------------------------------------------------------------------------

TINY_SETS = {"depth": "8", "width": "4", "attack_steps": "2", "proxy_eval_size": "64", "cw": "false",
             "eval_attack.steps": "2", "bits": "2", "phase2_start": "0.5"}
# trainables.train runs for the 1- and 4-bit CLI checks: as small as a real run gets
SMALL = ["--dataset", "digits", "--subset-train", "100", "--subset-test", "50", "--depth", "8",
         "--width", "4", "--epochs", "1", "--batch-size", "50", "--attack-steps", "1", "--eval-steps", "1",
         "--no-cw", "--ensemble", "2", "--group-lasso", "1", "--group-mode", "prox"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def export_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.export", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 1-trial, 1-epoch ternary sweep (tiny model, digits)."""
    tmp = tmp_path_factory.mktemp("export-sweep")
    cmd = [sys.executable, "-m", "search.pareto", "--name", "exp", "--trials", "1", "--epochs", "1",
           "--subset-train", "200", "--subset-test", "100", "--quiet", "--num-cpus", "1",
           "--storage-path", str(tmp / "results"), "--tracking-uri", mlflow_uri(tmp)]
    for k, v in TINY_SETS.items():
        cmd += ["--set", f"{k}={v}"]
    p = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=400, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    import pyarrow.parquet as pq

    trial = pq.read_table(tmp / "results/exp/trials.parquet").to_pylist()[0]
    return tmp, trial


@pytest.mark.slow
def test_cli_exports_a_sweep_trial(sweep):
    tmp, trial = sweep
    tid = trial["trial_id"]
    p = export_cli("--name", "exp", "--trial", tid, "--out", "out", "--check", "--onnx",
                   "--storage-path", "results", cwd=tmp)
    assert p.returncode == 0, p.stderr
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line["check"] == "ok" and line["onnx_check"] == "ok" and line["bits"] == 2
    packed = tmp / "out" / f"exp-{tid}.brpk"
    assert Path(line["packed"]) == packed.resolve() and (tmp / "out" / f"exp-{tid}.onnx").exists()
    assert packed.stat().st_size <= ex.size_bound(trial["size_bits"])
    h = ex.read_header(packed)
    assert h["size_bits"] == trial["size_bits"] and h["arch"]["depth"] == 8 and h["quant"]["bits"] == 2
    assert h["meta"]["trial_id"] == tid and h["meta"]["metrics"]["clean_acc"] == trial["clean_acc"]
    # Tune's own record (used where trial directories are named otherwise) points at the same checkpoint
    from search.storage import SweepLocation

    assert SweepLocation(str(tmp / "results"), "exp").tune_checkpoint(tid) == Path(h["meta"]["checkpoint"])


def export_main(args: list[str], capsys) -> tuple[int, str, str]:
    """search.export in this process (as the subprocess runs it, minus the interpreter start)."""
    from search.export import main

    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_cli_bad_input_writes_nothing(sweep, capsys, monkeypatch):
    tmp, trial = sweep
    monkeypatch.chdir(tmp)
    (tmp / "afile").write_text("x")
    cases = [
        (["--name", "nope", "--trial", trial["trial_id"]], "--name nope: no sweep of that name"),
        (["--name", "exp", "--trial", "zzz"], f"--trial zzz: sweep 'exp' has no such trial; accepted: {trial['trial_id']}"),
        (["--run", "results"], "no final model"),
        (["--run", "nowhere"], "--run nowhere: no such directory"),
        (["--name", "exp"], "--trial"),
        (["--name", "exp", "--trial", trial["trial_id"], "--storage-path", "nosuch://b/x"], "--storage-path nosuch://b/x: cannot read it"),
        (["--name", "exp", "--trial", trial["trial_id"], "--image-size", "0"], "--image-size 0"),
    ]
    for args, msg in cases:
        argv = [*args, "--out", "bad"] + ([] if "--storage-path" in args else ["--storage-path", "results"])
        rc, out, err = export_main(argv, capsys)
        assert rc == 2 and msg in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and not out, err
        assert not (tmp / "bad").exists()
    rc, _, err = export_main(["--name", "exp", "--trial", trial["trial_id"], "--out", "afile/sub",
                              "--storage-path", "results"], capsys)
    assert rc == 2 and "--out afile/sub: not writable" in err and err.count("\n") == 1


def test_cli_refuses_an_unfinished_trial(tmp_path, capsys, monkeypatch):
    """A trial MO-ASHA stopped (or that failed) has no final model: refused by name, nothing written."""
    import pandas as pd

    exp = tmp_path / "results" / "s"
    (exp / "trial_aaa" / "checkpoint_000000").mkdir(parents=True)
    (exp / "experiment_state-x.json").write_text("{}")
    pd.DataFrame({"trial_id": ["aaa", "bbb"], "status": ["stopped", "completed"]}).to_parquet(exp / "trials.parquet")
    monkeypatch.chdir(tmp_path)
    rc, out, err = export_main(["--name", "s", "--trial", "aaa", "--out", "o", "--storage-path", "results"], capsys)
    assert rc == 2 and err == "error: --trial aaa is stopped; accepted: a completed trial (bbb)\n" and not out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits", [1, 4])
def test_cli_exports_a_training_run(tmp_path, bits, capsys):
    from trainables.train import main as train_main

    run = tmp_path / f"run{bits}"
    assert train_main([*SMALL, "--bits", str(bits), "--out", str(run)]) == 0
    rc, out, err = export_main(["--run", str(run), "--out", str(tmp_path / "out"), "--check"], capsys)
    assert rc == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert line["check"] == "ok" and line["bits"] == bits and line["size_bits"] == metrics["size_bits"]
    assert line["bytes"] <= ex.size_bound(metrics["size_bits"])
    assert ex.read_header(line["packed"])["meta"]["run"] == str(run.resolve())
