"""Training throughput on one device: plain vs PGD-k epochs, each training option, packed trials.

On the device it is given (CUDA if present, else CPU), with CIFAR-shaped uint8 images held on
the device and augmented there (crop + flip), it measures `trainables.loop.Run.train_epoch`, the
code path every trial runs:

  plain     images/s of a plain training epoch (no attack: one forward/backward per batch)
  pgd       images/s of a PGD-k training epoch (k = 10 by default; `madry` loss)
  floor     floor_ratio = pgd epoch time / ((k + 1) x plain epoch time): 1.0 is the floor, a
            PGD-k epoch cannot cost less than k + 1 forward/backward passes of a plain one
  options   the PGD epoch with each option of `trainables` alone: --precision bf16 / fp16,
            channels-last, torch.compile (--compile), against fp32 (ratios > 1 are faster)
  packed    sweep throughput (epochs per hour, all trials together) with 1, 2, 4, 8 trials at
            once on the device, each its own process as Ray runs fractional-GPU trials;
            packed_speedup = best packed throughput / one trial's

The plain/PGD/option epochs alternate in one process (median of --rounds rounds). The model is
ResNet20 width 16 with 4-bit Binary-Relax weights (relaxed phase), noise 0.1, batch 128 on CUDA.
The last stdout line is a JSON object: device, plain_img_s, pgd_img_s, floor_ratio,
packed_speedup, and the details.

    python benchmarks/gpu_throughput.py                              # CUDA if present
    python benchmarks/gpu_throughput.py --device cpu --quick         # small, a minute on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainables.config import TrainConfig  # noqa: E402
from trainables.data import DataBundle, Split  # noqa: E402
from trainables.device import device_name, pick_device, synchronize  # noqa: E402
from trainables.loop import Run  # noqa: E402

OPTIONS = {  # name -> config overrides of the PGD run
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
}


def synthetic(n: int, seed: int = 0, size: int = 32) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    small = Split(x[:64], y[:64])
    return DataBundle("synthetic", Split(x, y), small, small, 10, augment=True)


def make_run(a: argparse.Namespace, data: DataBundle, steps: int, **over) -> Run:
    cfg = TrainConfig(dataset="digits", depth=a.depth, width=a.width, noise=0.1, ensemble=1,
                      batch_size=a.batch, epochs=1000, lr=0.01, loss="madry", device=a.device, cw=False)
    cfg.quant.bits = a.bits
    cfg.quant.phase2_start = 1.0  # relaxed phase throughout, where most of training happens
    cfg.train_attack.steps = max(1, steps)
    cfg.train_attack.eps = 8 / 255 if steps else 0.0  # eps 0: no attack, a plain epoch
    cfg.train_attack.step = 2 / 255
    for k, v in over.items():
        setattr(cfg, k, v)
    return Run(cfg, data)


def timed_epoch(run: Run) -> float:
    synchronize(run.device)
    t0 = time.perf_counter()
    run.train_epoch()
    synchronize(run.device)
    return time.perf_counter() - t0


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(a: argparse.Namespace) -> None:
    """One packed trial: warm up, wait for the others at a file barrier, time a.epochs epochs."""
    if a.threads:
        torch.set_num_threads(a.threads)
    run = make_run(a, synthetic(a.images, seed=a.seed, size=a.size), a.steps, **json.loads(a.over))
    timed_epoch(run)  # warm-up (cuDNN autotuning, allocator, compile)
    barrier = Path(a.barrier)
    (barrier / f"ready-{a.seed}").touch()
    while len(list(barrier.glob("ready-*"))) < a.n:
        time.sleep(0.01)
    t0 = time.time()
    for _ in range(a.epochs):
        timed_epoch(run)
    print(json.dumps({"start": t0, "end": time.time(), "epochs": a.epochs,
                      "mem_mb": peak_mem_mb(run.device)}), flush=True)


def packed(a: argparse.Namespace, n: int, over: dict) -> dict:
    """n trial processes at once on the device; epochs per hour of them all together."""
    with tempfile.TemporaryDirectory() as barrier:
        threads = max(1, a.threads // n) if a.device == "cpu" else 0
        cmd = [sys.executable, __file__, "--worker", "--n", str(n), "--barrier", barrier,
               "--device", a.device, "--images", str(a.images), "--batch", str(a.batch),
               "--depth", str(a.depth), "--width", str(a.width), "--bits", str(a.bits),
               "--steps", str(a.steps), "--epochs", str(a.packed_epochs), "--threads", str(threads),
               "--size", str(a.size),
               "--over", json.dumps(over)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs = [subprocess.Popen(cmd + ["--seed", str(i)], stdout=subprocess.PIPE, text=True, env=env)
                 for i in range(n)]
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=a.timeout)
            if p.returncode != 0:
                raise SystemExit(f"packed worker failed (exit {p.returncode}) with {n} trials at once")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    epochs = sum(o["epochs"] for o in outs)
    return {"trials": n, "epochs_per_hour": epochs * 3600 / wall, "wall_s": wall,
            "img_s": epochs * a.images / wall, "mem_per_trial_mb": max(o["mem_mb"] for o in outs)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="depth 8 width 4, 32 images of 16x16, one round, fp32 and bf16, packs of 1 and 2 (for CPU and CI)")
    p.add_argument("--images", type=int, help="images per epoch (default 10240 on CUDA, 512 on CPU, 32 quick)")
    p.add_argument("--batch", type=int, help="default 128 (32 with --quick)")
    p.add_argument("--size", type=int, default=32, help="image side (16 with --quick)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="k: PGD steps of the training attack")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the plain/PGD/option epochs")
    p.add_argument("--options", default="fp32,bf16,fp16,channels_last,compile",
                   help="options to measure (comma list of fp32, bf16, fp16, channels_last, compile)")
    p.add_argument("--packs", default="1,2,4,8", help="trials at once to measure")
    p.add_argument("--packed-epochs", type=int, default=2, help="timed epochs per packed trial")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (split between packed trials)")
    p.add_argument("--timeout", type=float, default=1800)
    # internal: one packed trial
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--over", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = pick_device(a.device)
    a.device = str(device)
    on_cuda = device.type == "cuda"
    if a.quick:
        a.depth, a.width = min(a.depth, 8), min(a.width, 4)
        a.images = a.images or 32
        a.batch = a.batch or 32
        a.rounds = min(a.rounds, 1)
        if "--size" not in (argv if argv is not None else sys.argv[1:]):
            a.size = 16
        if "--options" not in (argv if argv is not None else sys.argv[1:]):
            a.options = "fp32,bf16"  # compile takes minutes to build on a CPU
        if "--packs" not in (argv if argv is not None else sys.argv[1:]):
            a.packs = "1,2"
        a.packed_epochs = 3
    a.images = a.images or (10240 if on_cuda else 512)
    a.batch = a.batch or (128 if on_cuda else 32)
    if a.worker:
        worker(a)
        return {}

    options = [o for o in a.options.split(",") if o]
    bad = [o for o in options if o not in OPTIONS]
    if bad:
        p.error(f"--options {','.join(bad)}; accepted: {', '.join(OPTIONS)}")
    if device.type == "cuda" and "bf16" in options and not torch.cuda.is_bf16_supported():
        options.remove("bf16")
    data = synthetic(a.images, size=a.size)
    runs = {"plain": make_run(a, data, 0), "pgd": make_run(a, data, a.steps)}
    for o in options:
        if o != "fp32":
            runs[o] = make_run(a, data, a.steps, **OPTIONS[o])
    for r in runs.values():  # warm-up: autotuning, allocator, compilation
        timed_epoch(r)
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(a.rounds):
        for k in names[i % len(names):] + names[: i % len(names)]:
            times[k].append(timed_epoch(runs[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    plain_img_s = a.images / med["plain"]
    pgd_img_s = a.images / med["pgd"]
    floor_ratio = med["pgd"] / ((a.steps + 1) * med["plain"])
    opt = {o: {"img_s": a.images / med["pgd" if o == "fp32" else o],
               "speedup_vs_fp32": med["pgd"] / med["pgd" if o == "fp32" else o]} for o in options}
    best = max(options, key=lambda o: opt[o]["img_s"]) if options else "fp32"
    del runs
    if on_cuda:
        torch.cuda.empty_cache()

    packs = [int(n) for n in a.packs.split(",") if n]
    pk = [packed(a, n, OPTIONS.get(best, {})) for n in packs]
    one = next((r for r in pk if r["trials"] == 1), pk[0])
    speedup = max(r["epochs_per_hour"] for r in pk) / one["epochs_per_hour"]

    result = {
        "device": device_name(device), "plain_img_s": plain_img_s, "pgd_img_s": pgd_img_s,
        "floor_ratio": floor_ratio, "packed_speedup": speedup, "attack_steps": a.steps,
        "images": a.images, "image_size": a.size, "batch": a.batch, "depth": a.depth, "width": a.width, "bits": a.bits,
        "rounds": a.rounds, "threads": a.threads, "options": opt, "packed_option": best, "packed": pk,
        "torch": torch.__version__,
    }
    print(f"device {result['device']}  ResNet{a.depth} width {a.width}, {a.bits}-bit BR, batch {a.batch}, "
          f"{a.images} images/epoch, PGD-{a.steps}, median of {a.rounds} rounds")
    print(f"plain epoch  {plain_img_s:10.1f} img/s")
    print(f"PGD-{a.steps} epoch {pgd_img_s:10.1f} img/s   floor_ratio {floor_ratio:.3f} (1.0 = {a.steps + 1} plain passes)")
    for o in options:
        print(f"  option {o:<14} {opt[o]['img_s']:10.1f} img/s   x{opt[o]['speedup_vs_fp32']:.3f} vs fp32")
    for r in pk:
        print(f"packed {r['trials']} at once ({best}): {r['epochs_per_hour']:10.1f} epochs/h, "
              f"{r['img_s']:.1f} img/s, peak memory per trial {r['mem_per_trial_mb']:.0f} MiB")
    print(f"packed_speedup {speedup:.3f}")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
