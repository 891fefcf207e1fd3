"""Chaos: a real sweep under a seeded random schedule of faults, then every store checked.

Runs `python -m search.pareto` as a user would (digits, local Ray, 2 trials at once) against a
real `mlflow server` on 127.0.0.1 (and, with `--s3`, storage on an S3 server on 127.0.0.1, moto),
while faults hit it at random moments:

    driver_kill        SIGKILL of the driver's process group (the driver, Ray's GCS and raylet; the
                       trial workers, in process groups of their own, die with the raylet), then
                       the same command line with --resume
    driver_kill_write  the same, timed to a write: the kill follows within one poll (a few ms) the
                       moment a new checkpoint folder appears in the storage path or the Optuna
                       journal grows, so it often lands mid-upload or mid-append (not always: the
                       write may have finished within the poll); after 180 s with no write seen it
                       kills anyway, and says so
    worker_kill        SIGKILL of one running trial's worker process (Tune retries the trial from
                       its last checkpoint, --max-failures)
    tracking_down      the tracking server SIGKILLed, started again on the same store after
                       60-180 s x --scale
    s3_down            (--s3) the S3 server stopped, started again on the same port and data after
                       60-180 s x --scale

A fault's moment is drawn from the seed as "after K trials finished, plus D seconds", K = 0
counting from the moment the sweep has stored its record (`sweep.json`; a driver killed before
that has no sweep to resume, and the harness starts it again without --resume, counted in
resumes_needed); faults fire in order and outages overlap whatever comes next. `--seed`
replays the same schedule (the same kinds, moments and downtimes; what each one hits depends on
the machine's speed). `--scale` shortens the downtimes only (0.25: 15-45 s), for quick runs;
the moments are unchanged.

When the sweep has ended (exit 0), the services are brought back and every store is checked:

    trials.parquet  --trials rows, each trial id once, every trial finished
    Optuna journal  one COMPLETE (FAIL for a failed trial) per trial, none RUNNING
    MLflow          one parent (FINISHED); one child per trial with a final status, each epoch's
                    metrics logged once; children no stored trial accounts for ended as lost;
                    one logged model per completed trial
    checkpoints     each completed trial's final checkpoint holds a loadable model; torn (unreadable)
                    checkpoints left anywhere are counted
    front           pareto.parquet == the non-dominated set of the table's feasible completed rows

A driver run that exits non-zero without having been killed, or exits 130 (interrupted), needs
another plain --resume: the harness runs it and counts it in `resumes_needed` (when the
--resume was refused because the tracking server is away, it first waits for the server, and
counts it in `refused_tracking_down` too); a sweep whose end left logging for --resume-logging
counts in `replays_needed`, and in `replays_server_late` when the server was still away at the
sweep's end or back less than 30 s before it (the replay the sweep promises then; any other
replay fails the verdict). The last stdout line is a JSON verdict: {"seed", "faults",
"faults_missed" (fired at nothing: no trial running), "by_kind", "lost", "duplicated", "orphans",
"unknown_to_tune" (finished in Optuna, in no table: it ended after Tune's last snapshot),
"resumes_needed", "refused_tracking_down", "replays_needed", "replays_server_late",
"torn_checkpoints", "front_ok", "ok", "wall_s", ...}. "lost" counts trials missing from a store
plus (trial, epoch, metric) points missing in MLflow. The checks are in chaos_check.py.

    python benchmarks/chaos.py --seed 1                       # 10 trials x 3 epochs, 6 faults
    python benchmarks/chaos.py --seed 1 --scale 0.25          # downtimes of 15-45 s
    python benchmarks/chaos.py --seed 1 --s3 --faults 8       # + S3 storage and its outages
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chaos_check import NAME, check  # noqa: E402

from trainables.contract import (  # noqa: E402 - after the path setup, as a script
    RECORD_FILE,
    STATE_DIR,
    STUDY_JOURNAL,
)

TINY_SETS = ["depth=8", "width=4", "attack_steps=2", "proxy_eval_size=64", "cw=false", "eval_attack.steps=2"]
KINDS = ("driver_kill", "driver_kill_write", "worker_kill", "tracking_down")
S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
WORKER_RE = re.compile(r"^ray::(ImplicitFunc|_Inner|trainable)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="the fault schedule's seed (also the sweep's --seed)")
    p.add_argument("--faults", type=int, default=6, help="faults to inject (each kind at least once when room)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--subset-train", type=int, default=300)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the downtimes (60-180 s); 0.25 for quick runs")
    p.add_argument("--s3", action="store_true", help="storage on an S3 server on 127.0.0.1 (moto), with s3_down faults")
    p.add_argument("--timeout", type=float, default=3600, help="give up (a hang) after this many seconds")
    p.add_argument("--workdir", help="where the run's files go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the workdir also when the verdict is ok")
    a = p.parse_args(argv)
    if a.faults < 1 or a.trials < 4 or a.epochs < 2 or a.scale <= 0:
        p.error(f"--faults {a.faults}, --trials {a.trials}, --epochs {a.epochs}, --scale {a.scale}: "
                "accepted: --faults >= 1, --trials >= 4, --epochs >= 2, --scale > 0")
    return a


# --- the schedule -----------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    after_done: int  # fires once this many trials have finished ...
    delay_s: float  # ... plus this many seconds
    down_s: float = 0.0  # tracking_down, s3_down: how long the service stays away
    fired_at: float | None = None  # seconds since the start
    note: str = ""


def schedule(seed: int, n: int, trials: int, scale: float, s3: bool) -> list[Fault]:
    """The seed's faults, in firing order: every kind once (while there is room), the rest drawn."""
    rng = random.Random(seed)
    kinds = list(KINDS) + (["s3_down"] if s3 else [])
    rng.shuffle(kinds)
    picked = kinds[:n] + [rng.choice(kinds) for _ in range(n - len(kinds))]
    rng.shuffle(picked)
    moments = sorted((rng.randint(0, trials - 3), round(rng.uniform(0, 20), 1)) for _ in picked)
    return [Fault(k, after, delay, round(rng.uniform(60, 180) * scale, 1) if k.endswith("_down") else 0.0)
            for k, (after, delay) in zip(picked, moments)]


# --- the services -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """`mlflow server` on 127.0.0.1 over one sqlite store, in its own process group."""

    def __init__(self, work: Path) -> None:
        self.work, self.port, self.proc = work, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()

    def start(self, timeout: float = 600) -> None:
        with self.lock:
            if self.proc is None:
                self._spawn()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not up after {timeout:.0f} s; see {self.work / 'mlflow-server.log'}")

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _spawn(self) -> None:
        with open(self.work / "mlflow-server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.work / 'mlflow.db'}",
                 "--artifacts-destination", str(self.work / "mlartifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        with self.lock:
            if self.proc is not None:
                kill_group(self.proc.pid)
                self.proc.wait(timeout=60)
            self.proc = None


class S3Server:
    """An S3 API (moto) on 127.0.0.1 in this process; its data outlives a stop, as a real
    object store's would."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls, self.port, self.server = ThreadedMotoServer, free_port(), None
        self.storage = (f"s3://sweeps/results?endpoint_override=127.0.0.1:{self.port}&scheme=http"
                        "&allow_delayed_open=true")

    def start(self) -> None:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
        if self.server is None:
            self.server = self._cls(ip_address="127.0.0.1", port=self.port)
            self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key="testing",
                                 secret_key="testing", region="us-east-1", allow_bucket_creation=True,
                                 allow_delayed_open=True)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- the sweep --------------------------------------------------------------------------------

@dataclass
class Attempt:
    """One `python -m search.pareto` process: the first run or a --resume."""

    proc: subprocess.Popen
    log: Path
    resume: bool
    killed: bool = False


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    tracking: TrackingServer
    s3: S3Server | None
    storage: str
    t0: float = field(default_factory=time.monotonic)
    attempts: list[Attempt] = field(default_factory=list)
    resumes_needed: int = 0
    refused_tracking_down: int = 0  # of those: --resume refused while the tracking server was away
    events: list[str] = field(default_factory=list)
    pending_up: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, service)
    tracking_killed: list[float] = field(default_factory=list)  # elapsed s of each tracking_down
    tracking_back: list[float] = field(default_factory=list)  # elapsed s when a restarted server answered
    ended_at: float | None = None  # elapsed s when the last driver exited 0

    def service(self) -> None:
        """Bring back the services whose downtime is over (called from every wait loop)."""
        now = time.monotonic()
        for due, what in [p for p in self.pending_up if p[0] <= now]:
            self.pending_up.remove((due, what))
            if not any(w == what for _, w in self.pending_up):  # an overlapping outage of it lasts longer
                bring_up(self, what)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
                   BRSEARCH_STATE_CACHE=str(self.work / "cache"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        if self.s3 is not None:
            env.update(S3_CREDS)
        return env

    def command(self, *extra: str) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "search.pareto", "--name", NAME, "--trials", str(a.trials), "--epochs", str(a.epochs),
               "--max-concurrent", "2", "--num-cpus", "2", "--seed", str(a.seed), "--subset-train", str(a.subset_train),
               "--subset-test", "100", "--storage-path", self.storage, "--tracking-uri", self.tracking.uri, "--quiet"]
        for s in TINY_SETS:
            cmd += ["--set", s]
        return cmd + list(extra)

    def launch(self, resume: bool) -> Attempt:
        n = len(self.attempts)
        log = self.work / f"driver-{n}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(self.command(*(["--resume"] if resume else [])), cwd=self.work, env=self.env(),
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        att = Attempt(proc, log, resume)
        self.attempts.append(att)
        self.say(f"driver {n} started{' (--resume)' if resume else ''}, pid {proc.pid}")
        return att

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, line: str) -> None:
        line = f"[{self.elapsed():7.1f} s] {line}"
        self.events.append(line)
        print(line, flush=True)

    def done(self) -> int:
        """Trials finished so far: the highest `[k/N]` progress line of any driver run."""
        best = 0
        for att in self.attempts:
            for m in re.finditer(r"^\[(\d+)/\d+\] ", att.log.read_text(errors="replace"), re.M):
                best = max(best, int(m.group(1)))
        return best

    def kill_driver(self, why: str) -> None:
        att = self.current
        att.killed = True
        kill_group(att.proc.pid)
        try:
            att.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        self.say(f"driver {len(self.attempts) - 1} SIGKILLed with its process group ({why})")

    # what a write looks like in the storage path (local storage: checkpoints and the journal;
    # s3: the journal's local copy, which StateSync pushes)
    def write_marks(self) -> tuple[int, frozenset[str]]:
        if self.s3 is None:
            exp = Path(self.storage) / NAME
            journal = exp / STATE_DIR / STUDY_JOURNAL
            cps = frozenset(str(p) for p in exp.glob("trial_*/checkpoint_*"))
        else:
            found = list((self.work / "cache").glob(f"*/{STATE_DIR}/{STUDY_JOURNAL}"))
            journal, cps = (found[0] if found else None), frozenset()
        try:
            size = journal.stat().st_size if journal is not None else 0
        except OSError:
            size = 0
        return size, cps

    def stored(self) -> bool:
        """The sweep's record exists (a --resume can find it)."""
        if self.s3 is None:
            return (Path(self.storage) / NAME / STATE_DIR / RECORD_FILE).exists()
        return any((self.work / "cache").glob(f"*/{STATE_DIR}/{RECORD_FILE}"))

    def worker_pids(self) -> list[int]:
        """The running trials' worker processes of the current driver: descendants of it (Ray
        starts them in process groups of their own) whose title is a trainable's."""
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        children: dict[int, list[int]] = {}
        titles: dict[int, str] = {}
        for line in out.splitlines():
            parts = line.split(None, 2)
            if len(parts) == 3:
                children.setdefault(int(parts[1]), []).append(int(parts[0]))
                titles[int(parts[0])] = parts[2]
        todo, found = [self.current.proc.pid], []
        while todo:
            pid = todo.pop()
            for c in children.get(pid, []):
                todo.append(c)
                if WORKER_RE.search(titles[c]) and ".train" in titles[c]:
                    found.append(c)
        return found


def fire(run: Run, fault: Fault, rng: random.Random) -> None:
    """Inject one fault; outages only schedule their end (in `pending_up`)."""
    fault.fired_at = round(run.elapsed(), 1)
    if fault.kind == "driver_kill":
        run.kill_driver("driver_kill")
        time.sleep(rng.uniform(1, 3))
        run.launch(resume=True)
    elif fault.kind == "driver_kill_write":
        size0, cps0 = run.write_marks()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.current.proc.poll() is None:
            size, cps = run.write_marks()
            if size != size0 or cps - cps0:
                fault.note = "journal append" if size != size0 else f"checkpoint {sorted(cps - cps0)[0].rsplit('/', 2)[-2:]}"
                break
            run.service()
            time.sleep(0.003)
        else:
            fault.note = "no write seen in 180 s" if run.current.proc.poll() is None else "driver ended first"
        if run.current.proc.poll() is None:
            run.kill_driver(f"driver_kill_write: {fault.note}")
            time.sleep(rng.uniform(1, 3))
            run.launch(resume=True)
    elif fault.kind == "worker_kill":
        deadline = time.monotonic() + 60
        pids: list[int] = []
        while time.monotonic() < deadline and run.current.proc.poll() is None:
            pids = run.worker_pids()
            if pids:
                break
            run.service()
            time.sleep(0.5)
        if pids:
            pid = rng.choice(sorted(pids))
            try:
                os.kill(pid, signal.SIGKILL)
                fault.note = f"worker pid {pid}"
            except ProcessLookupError:
                fault.note = f"worker pid {pid} gone before the kill"
        else:
            fault.note = "no trial worker running in 60 s"
        run.say(f"worker_kill: {fault.note}")
    elif fault.kind == "tracking_down":
        run.tracking.kill()
        run.tracking_killed.append(run.elapsed())
        run.pending_up.append((time.monotonic() + fault.down_s, "tracking"))
        run.say(f"tracking server SIGKILLed for {fault.down_s:.0f} s")
    elif fault.kind == "s3_down":
        assert run.s3 is not None
        run.s3.stop()
        run.pending_up.append((time.monotonic() + fault.down_s, "s3"))
        run.say(f"S3 server stopped for {fault.down_s:.0f} s")


def bring_up(run: Run, what: str) -> None:
    if what == "tracking":
        threading.Thread(target=_start_tracking, args=(run,), daemon=True).start()
    else:
        run.s3.start()
        run.say("S3 server back")


def _start_tracking(run: Run) -> None:
    run.say("tracking server starting again")
    run.tracking.start()
    run.tracking_back.append(run.elapsed())
    run.say("tracking server back (answers /health)")


def drive(run: Run, faults: list[Fault]) -> str:
    """Run the sweep through the schedule; returns 'finished' or why not."""
    rng = random.Random(run.args.seed * 7919 + 1)
    reached: dict[int, float] = {}  # trials finished -> when first seen (0: when the sweep was stored)
    run.launch(resume=False)
    queue = list(faults)
    while True:
        if run.elapsed() > run.args.timeout:
            run.kill_driver("timeout")
            return f"hang: not finished after {run.args.timeout:.0f} s"
        run.service()
        now = time.monotonic()
        if reached or run.stored():
            for k in range(run.done() + 1):
                reached.setdefault(k, now)
        rc = run.current.proc.poll()
        if rc is not None:
            if rc == 0:
                run.ended_at = run.elapsed()
                break
            run.resumes_needed += 1
            refused = "cannot reach" in run.current.log.read_text(errors="replace")[-2000:]
            run.say(f"driver {len(run.attempts) - 1} exited {rc} by itself"
                    + (" (refused: the tracking server is away); waiting for it" if refused else "")
                    + ": another --resume needed")
            unknown = "no sweep named" in run.current.log.read_text(errors="replace")[-2000:]
            if unknown:  # killed before it stored the sweep: what a user does is start it again
                run.say("the sweep was never stored: starting it again without --resume")
                run.launch(resume=False)
                continue
            if refused:
                run.refused_tracking_down += 1
                while run.tracking.proc is None or not run.tracking.up():
                    run.service()
                    time.sleep(0.5)
            if run.resumes_needed > 10:
                return f"failed: driver exited {rc} after {run.resumes_needed} extra resumes"
            run.launch(resume=True)
            continue
        if queue and queue[0].after_done in reached and now >= reached[queue[0].after_done] + queue[0].delay_s:
            fault = queue.pop(0)
            run.say(f"fault {fault.kind} (after {fault.after_done} trials + {fault.delay_s} s)")
            fire(run, fault, rng)
            continue
        time.sleep(0.2)
    run.say(f"sweep ended (exit 0); {len(queue)} fault(s) left unfired")
    for f in queue:
        f.note = "not fired: the sweep ended first"
    for what in sorted({w for _, w in run.pending_up}):  # cut short: the stores are checked with everything up
        run.say(f"{what} still down at the end: brought back now")
        bring_up(run, what)
    run.tracking.start()
    return "finished"


# --- the checks -------------------------------------------------------------------------------

LATE_S = 30  # a tracking server back this long before the sweep's end must leave nothing to replay


def tracking_late(run: Run) -> bool:
    """The tracking server was away at the sweep's end, or back less than LATE_S before it: a
    replay (--resume-logging) is then what the sweep promises, not a fault of it."""
    if not run.tracking_killed or run.ended_at is None:
        return False
    back = [t for t in run.tracking_back if t > run.tracking_killed[-1]]
    return not back or back[0] > run.ended_at - LATE_S


def _fs_and_root(run: Run):
    import pyarrow.fs as pafs

    if run.s3 is None:
        return pafs.LocalFileSystem(), str(Path(run.storage) / NAME)
    return run.s3.fs(), f"sweeps/results/{NAME}"


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix=f"chaos-{a.seed}-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    faults = schedule(a.seed, a.faults, a.trials, a.scale, a.s3)
    print(f"chaos seed {a.seed}: {a.trials} trials x {a.epochs} epochs, 2 at once, scale {a.scale:g}, "
          f"{'s3' if a.s3 else 'local'} storage; workdir {work}")
    for i, f in enumerate(faults):
        print(f"  fault {i}: {f.kind:<17} after {f.after_done} trials + {f.delay_s:4.1f} s"
              + (f", down {f.down_s:.0f} s" if f.down_s else ""))
    tracking = TrackingServer(work)
    s3 = None
    if a.s3:
        os.environ.update(S3_CREDS)
        s3 = S3Server()
        s3.start()
        s3.fs().create_dir("sweeps")
    run = Run(a, work, tracking, s3, s3.storage if s3 else str(work / "results"))
    t0 = time.monotonic()
    verdict: dict = {"seed": a.seed}
    try:
        tracking.start()
        run.t0 = time.monotonic()
        outcome = drive(run, faults)
        replays = late_return = 0
        if outcome == "finished":
            tail = run.current.log.read_text(errors="replace")
            if "--resume-logging" in tail and "not sent" in tail:
                replays += 1
                late_return = int(tracking_late(run))
                run.say("the sweep's end left logging for --resume-logging: running it")
                subprocess.run(run.command("--resume-logging"), cwd=work, env=run.env(), timeout=900,
                               stdout=open(work / "resume-logging.log", "w"), stderr=subprocess.STDOUT, check=False)
            verdict.update(check(*_fs_and_root(run), run.tracking.uri, a.trials, a.epochs, run.work))
        else:
            verdict.update({"lost": None, "duplicated": None, "problems": [outcome]})
        fired = [f for f in faults if f.fired_at is not None]
        missed = [f for f in fired if f.note.startswith(("no trial worker", "driver ended first"))]
        verdict.update({"outcome": outcome, "faults": len(fired), "faults_missed": len(missed), "by_kind": dict(Counter(f.kind for f in fired)),
                        "resumes_needed": run.resumes_needed, "refused_tracking_down": run.refused_tracking_down,
                        "replays_needed": replays, "replays_server_late": late_return,
                        "driver_runs": len(run.attempts), "wall_s": round(time.monotonic() - t0, 1)})
        verdict["ok"] = (outcome == "finished" and verdict["lost"] == 0 and verdict["duplicated"] == 0
                         and verdict.get("orphans") == 0 and verdict.get("front_ok") and run.resumes_needed == 0
                         and replays == late_return and not verdict.get("unknown_to_tune"))
    finally:
        for att in run.attempts:
            kill_group(att.proc.pid)
        tracking.kill()
        if s3 is not None:
            s3.stop()
    print("\nschedule:")
    for f in faults:
        print(f"  {f.kind:<17} after {f.after_done} trials + {f.delay_s:4.1f} s: "
              + (f"fired at {f.fired_at} s" if f.fired_at is not None else "not fired")
              + (f", down {f.down_s:.0f} s" if f.down_s else "") + (f" ({f.note})" if f.note else ""))
    for p in verdict.get("problems", []):
        print(f"PROBLEM: {p}")
    (work / "events.log").write_text("\n".join(run.events))
    (work / "schedule.json").write_text(json.dumps([asdict(f) for f in faults], indent=1))
    if verdict.get("ok") and not a.keep and not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    verdict["problems"] = len(verdict.get("problems", []))
    print(json.dumps(verdict))
    return 0 if verdict.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
