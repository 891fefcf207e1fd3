"""benchmarks/step_overhead.py runs as documented and its last stdout line carries the figures."""
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"


def test_step_overhead_prints_ratio_json_last():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--depth", "8", "--width", "4",
         "--batch", "8", "--steps", "2", "--rounds", "3", "--warmup", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("ratio", "ratio_vs_float_mix", "step_ms_br", "step_ms_float_mix", "step_ms_float_madry"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio"] == result["step_ms_br"] / result["step_ms_float_madry"]
    assert result["ratio_vs_float_mix"] == result["step_ms_br"] / result["step_ms_float_mix"]
    assert result["attack_steps"] == 2 and result["device"] == "cpu"
