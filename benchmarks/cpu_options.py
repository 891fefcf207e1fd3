"""Training options on the CPU, side by side: fp32 eager against --precision bf16, --compile
(torch.compile of the model) and --channels-last, on real data (digits, a CIFAR-10 subset).

Why: gpu_throughput.py measures the options on synthetic images and is meant for a GPU; this
answers whether any of them helps a CPU trial, and what --compile costs before its first step.

Per data set, one child process (a fresh, empty TorchInductor cache, so compilation is cold)
builds one `trainables.loop.Run` per option on the same data (EnResNet depth 8, width 4, 4-bit
BR, PGD-2 training, batch 128, one torch thread by default), times each option's first epoch
(it includes torch.compile's tracing and code generation), then --rounds rounds of one epoch
per option, the order rotating each round. Reported: first-epoch wall seconds, steady-state
median images/s per wall second and per CPU second of the process, their ratio to fp32 eager
(> 1: faster), and for compile the compile overhead (first compile epoch minus the median fp32
epoch) and dynamo's graph and graph-break counts. An option that fails is reported in one line
and the others still run. Last stdout line: JSON.

    python benchmarks/cpu_options.py                    # digits
    python benchmarks/cpu_options.py --cifar10          # + 512 images of the shared CIFAR-10 copy
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
OPTIONS = {"fp32": {}, "bf16": {"precision": "bf16"}, "compile": {"compile": True},
           "channels_last": {"channels_last": True}}

CHILD = r"""
import json, statistics, sys, time, torch
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.loop import Run
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec.pop("threads"))
rounds, options = spec.pop("rounds"), spec.pop("options")
data = load_data(TrainConfig.from_flat(spec))
n = len(data.train)

def epoch(run):
    t0, c0 = time.perf_counter(), time.process_time()
    run.train_epoch()
    return time.perf_counter() - t0, time.process_time() - c0

runs, first, errors = {}, {}, {}
for name, over in options.items():
    try:
        run = Run(TrainConfig.from_flat({**spec, **over}), data)
        first[name] = epoch(run)
        runs[name] = run
    except Exception as e:  # one line per failed option; the others still run
        msg = str(e).strip().splitlines()
        errors[name] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
wall = {k: [] for k in runs}
cpu = {k: [] for k in runs}
names = list(runs)
for r in range(rounds):
    for k in names[r % len(names):] + names[: r % len(names)]:
        w, c = epoch(runs[k])
        wall[k].append(w)
        cpu[k].append(c)
out = {"n": n, "errors": errors, "options": {}}
for k in names:
    out["options"][k] = {"first_epoch_s": first[k][0], "first_epoch_cpu_s": first[k][1],
                         "img_s": n / statistics.median(wall[k]), "img_per_cpu_s": n / statistics.median(cpu[k]),
                         "epoch_s": wall[k], "epoch_cpu_s": cpu[k]}
if "compile" in runs:
    from torch._dynamo.utils import counters
    out["dynamo"] = {"unique_graphs": int(counters["stats"]["unique_graphs"]),
                     "graph_breaks": int(sum(counters["graph_break"].values())),
                     "break_reasons": sorted(counters["graph_break"])[:5]}
print(json.dumps(out))
"""


def child(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as cache:  # cold compile: no inductor cache from earlier runs
        env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=cache)
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the benchmark child failed (exit {p.returncode}): {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--options", default="fp32,bf16,compile,channels_last",
                   help=f"comma list of {', '.join(OPTIONS)} (fp32 eager is always the reference)")
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per option")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--cifar10", action="store_true", help=f"also CIFAR-10 from {ARCHIVE}")
    p.add_argument("--cifar-subset", type=int, default=512, help="CIFAR-10 training images per epoch")
    a = p.parse_args(argv)
    names = ["fp32"] + [o for o in a.options.split(",") if o and o != "fp32"]
    bad = [o for o in names if o not in OPTIONS]
    if bad:
        p.error(f"--options {','.join(bad)}; accepted: {', '.join(OPTIONS)}")
    common = {"depth": 8, "width": 4, "bits": 4, "attack_steps": 2, "batch_size": 128,
              "eval_attack.steps": 1, "proxy_eval_size": 64, "device": "cpu", "threads": a.threads,
              "rounds": a.rounds, "options": {o: OPTIONS[o] for o in names}}
    sets = {"digits": {**common, "dataset": "digits"}}
    result: dict = {"threads": a.threads, "rounds": a.rounds, "load_avg": os.getloadavg()[0]}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        if a.cifar10:
            sys.path.insert(0, str(ROOT))
            from trainables.data import unpack_archive

            folder = unpack_archive(ARCHIVE, Path(tmp) / "data")
            sets["cifar10"] = {**common, "dataset": f"folder:{folder}",
                               "subset_train": a.cifar_subset + a.cifar_subset // 4, "subset_test": 64}
        for name, spec in sets.items():
            out = child(spec)
            ref = out["options"].get("fp32")
            for o, r in out["options"].items():
                if ref:
                    r["speedup_vs_fp32"] = r["img_s"] / ref["img_s"]
                    r["cpu_speedup_vs_fp32"] = r["img_per_cpu_s"] / ref["img_per_cpu_s"]
                line = (f"{name:<8} {out['n']} img/epoch  {o:<14} first epoch {r['first_epoch_s']:7.1f} s  "
                        f"{r['img_s']:8.1f} img/s  {r['img_per_cpu_s']:8.1f} img/CPU-s")
                if ref:
                    line += f"  x{r['speedup_vs_fp32']:.3f} wall  x{r['cpu_speedup_vs_fp32']:.3f} CPU vs fp32"
                print(line, flush=True)
            if ref and "compile" in out["options"]:
                c = out["options"]["compile"]
                c["compile_overhead_s"] = c["first_epoch_s"] - sorted(ref["epoch_s"])[len(ref["epoch_s"]) // 2]
                print(f"{name:<8} compile: first epoch {c['first_epoch_s']:.1f} s, about "
                      f"{c['compile_overhead_s']:.1f} s more than an eager epoch; dynamo {out.get('dynamo')}",
                      flush=True)
            for o, e in out["errors"].items():
                print(f"{name:<8} {o}: FAILED: {e}", flush=True)
            result[name] = out
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
