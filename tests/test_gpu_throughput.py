"""benchmarks/gpu_throughput.py runs on the CPU in its quick form and prints the figures last."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


@pytest.mark.slow  # end to end (subprocess or training); docs/testing.md
def test_gpu_throughput_quick_on_cpu_prints_the_json_last():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    print(out)  # the figures, with pytest -s
    r = json.loads(out.strip().splitlines()[-1])
    assert r["device"] == "cpu" and r["attack_steps"] == 10
    for key in ("plain_img_s", "pgd_img_s", "floor_ratio", "packed_speedup"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    # the definitions, from the reported parts
    assert r["pgd_img_s"] < r["plain_img_s"]  # k + 1 passes cost more than one
    floor = (r["images"] / r["pgd_img_s"]) / ((r["attack_steps"] + 1) * r["images"] / r["plain_img_s"])
    assert math.isclose(r["floor_ratio"], floor, rel_tol=1e-9)
    assert {"fp32", "bf16"} <= set(r["options"])
    assert r["options"]["fp32"]["img_s"] == r["pgd_img_s"]
    packs = {p["trials"]: p["epochs_per_hour"] for p in r["packed"]}
    assert set(packs) == {1, 2}
    assert math.isclose(r["packed_speedup"], max(packs.values()) / packs[1], rel_tol=1e-9)
    assert all(p["mem_per_trial_mb"] > 0 for p in r["packed"])
