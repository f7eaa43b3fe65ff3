"""Goodput under faults: a 2-rank run with a random rank SIGKILLed every T seconds, restarted by the elastic agent.

    python benchmarks/goodput.py [--every 60] [--duration 300] [--modes disk,async,snapshot] [--json FILE]

For each mode, the same training (phalanx_cnn on Fashion-MNIST, 2 CPU ranks, `--max-restarts` high enough) runs for
--duration seconds of training, while this script SIGKILLs one rank chosen at random every --every seconds; then
it stops the run with SIGTERM (a preemption: a checkpoint, exit 0). Modes:

    disk       synchronous disk checkpoints every --ckpt_minutes (the step waits for the whole write)
    async      the same checkpoints written in the background (`--ckpt.async true`)
    snapshot   the async checkpoints, and in-memory snapshots every --snapshot_every steps

Goodput = time in steps that count / wall time, from the first training step to the final checkpoint: of an
attempt that was killed, only its time until it saved the state the next attempt resumed from counts (see
`useful_time`); the redone steps, the restart and the set-up do not. A rank is killed
every --every seconds once the group of the previous kill trains again. Each recovery is split into: detection
(kill to the surviving rank's "stopped" line), restart (to the first new rank process, seen by polling),
rendezvous (to the new rank 0's process group: its "rank 0/W pid" line), set-up (data and model: the "run" line),
state load (reading the checkpoint or snapshot: the "resumed from" line) and first step (the "memory per rank"
line, after the first step). Results as a table and one JSON object (last line); --json writes it to a file.
The machine's load moves every figure: compare modes of one invocation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path("/usr/share/datasets/fashion-mnist")
MODES = {
    "disk": ["--ckpt.async", "false", "--ckpt.snapshot_every", "0"],
    "async": ["--ckpt.async", "true", "--ckpt.snapshot_every", "0"],
    "snapshot": ["--ckpt.async", "true"],  # + --ckpt.snapshot_every
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.TimeoutExpired):
        return "unknown CPU"


def workers(launcher: int, run_dir: Path) -> tuple[dict[int, int], set[int]]:
    """{rank: pid} of the launcher's live rank processes: its children, named by the "rank R/W pid P" lines of
    the rank logs (forked ranks get RANK after their exec, so /proc's environ does not show it)."""
    children = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher:
                children.add(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    out = {}
    for f in (run_dir / "logs").glob("rank-*.log"):
        try:
            pids = re.findall(r"rank (\d+)/\d+ pid (\d+) ", f.read_text(errors="replace"))
        except OSError:
            continue
        if pids and int(pids[-1][1]) in children:
            out[int(pids[-1][0])] = int(pids[-1][1])
    return out, children


STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) rank(\d+) \w+ (.*)$")


def log_lines(run_dir: Path) -> list[tuple[float, int, str]]:
    """(time, rank, message) of every rank's log, in time order."""
    rows = []
    for f in sorted((run_dir / "logs").glob("rank-*.log")):
        for line in f.read_text(errors="replace").splitlines():
            m = STAMP.match(line)
            if m:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                rows.append((t, int(m.group(2)), m.group(3)))
    return sorted(rows)


def first_after(rows, t0: float, pattern: str, rank: int | None = None) -> float | None:
    return next((t for t, r, msg in rows if t >= t0 and re.search(pattern, msg) and (rank is None or r == rank)),
                None)


PARTS = ("detection_s", "restart_s", "rendezvous_s", "setup_s", "state_load_s", "first_step_s")


def recoveries(rows, kills: list[tuple[float, int]], spawned: list[float]) -> list[dict]:
    """Each kill's recovery, as the times between its marks (see the module's docstring)."""
    out = []
    for t_kill, rank in kills:
        d = first_after(rows, t_kill, r"stopped while|stalled", 1 - rank)
        s = next((t for t in spawned if t > t_kill), None)
        z = first_after(rows, t_kill, r"^rank 0/\d+ pid \d+ ", 0)
        u = first_after(rows, t_kill, r"^run ", 0)
        fs = first_after(rows, t_kill, r"^memory per rank", 0)
        ld = first_after(rows, t_kill, r"^resumed from", 0)
        ld = ld if ld is not None and fs is not None and ld <= fs else u  # started from scratch: nothing to load
        marks = [t_kill, d, s, z, u, ld, fs]
        if any(m is None for m in marks):
            out.append({"killed_rank": rank, "incomplete": True})
            continue
        out.append({"killed_rank": rank, **{k: round(b - a, 3) for k, a, b in zip(PARTS, marks, marks[1:])},
                    "total_s": round(fs - t_kill, 3)})
    return out


def useful_time(rows, last: float) -> float:
    """Seconds of training whose steps count. Each attempt trains from its
    first step (its "memory per rank" line) on; of an attempt that was killed, only the time until it saved the
    state the next attempt resumed from counts (that snapshot's or checkpoint's line; nothing when the next
    attempt started from scratch); the last attempt counts to the final checkpoint."""
    starts = [t for t, r, msg in rows if r == 0 and msg.startswith("memory per rank")]
    useful = 0.0
    for i, a in enumerate(starts):
        if i + 1 == len(starts):
            useful += last - a
            break
        nxt = starts[i + 1]
        resumed = [int(m.group(1)) for t, r, msg in rows if r == 0 and a < t < nxt and msg.startswith("resumed from")
                   and (m := re.search(r"\(global step (\d+)\)", msg))]
        if not resumed:
            continue
        step = resumed[-1]
        saved = [t for t, r, msg in rows if r == 0 and a <= t < nxt and (
            f"in-memory snapshot of step {step} in" in msg or f"/step-{step:08d} (" in msg)]
        useful += (saved[0] - a) if saved else 0.0
    return useful


def run_mode(mode: str, args, root: Path) -> dict:
    run_dir = root / mode
    shm = Path(args.snapshot_dir)
    argv = [sys.executable, "-m", "phalanx", "train", "--data", str(args.data), "--nproc", "2", "--run_dir",
            str(run_dir), "--epochs", "1000", "--global_batch", str(args.global_batch), "--model.width", "16",
            "--threads_per_rank", "1", "--progress", "false", "--eval_every", "100000", "--max-restarts", "1000",
            "--ckpt.every_minutes", str(args.ckpt_minutes), "--ckpt.at_epoch_end", "false", "--tune", "false",
            "--parallel.timeout_s", str(args.timeout_s), *MODES[mode]]
    if mode == "snapshot":
        argv += ["--ckpt.snapshot_every", str(args.snapshot_every), "--ckpt.snapshot_dir", str(shm)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PHALANX_SLURM="0")
    log = open(root / f"{mode}.out", "w")  # noqa: SIM115 (closed below)
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rng = random.Random(args.seed)
    kills: list[tuple[float, int]] = []
    spawned: list[float] = []
    seen: set[int] = set()
    started = None
    deadline = None
    try:
        while p.poll() is None:
            now = time.time()
            pids, children = workers(p.pid, run_dir)
            for pid in children:
                if pid not in seen:
                    seen.add(pid)
                    spawned.append(now)
            if started is None and (run_dir / "metrics.jsonl").exists():
                started = now  # training has begun (the first logged steps)
                deadline = started + args.duration
            if started is not None and now >= deadline and (not kills or now > kills[-1][0] + 120 or first_after(
                    log_lines(run_dir), kills[-1][0], r"^memory per rank", 0) is not None):
                # stopped (a preemption: a checkpoint) once the last kill's group is training again
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=300)
                break
            # every --every seconds, once the group of the last kill trains again (a kill during a recovery would
            # only measure kills piling up)
            recovered = not kills or first_after(log_lines(run_dir), kills[-1][0], r"^memory per rank", 0) is not None
            if started is not None and now - (kills[-1][0] if kills else started) >= args.every and len(pids) == 2 \
                    and recovered:
                rank = rng.randrange(2)
                os.kill(pids[rank], signal.SIGKILL)
                kills.append((time.time(), rank))
                print(f"  {mode}: killed rank {rank} at {time.time() - started:.0f} s", flush=True)
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
    rows = log_lines(run_dir)
    from phalanx.train.checkpoint import find_latest, load
    final_step = load(find_latest(run_dir))["state"]["position"]["global_step"]
    first = first_after(rows, 0, r"^memory per rank", 0)
    last = max(t for t, _, msg in rows if msg.startswith("checkpoint "))
    useful = useful_time(rows, last)
    wall = last - first
    rec = recoveries(rows, kills, spawned)
    done = [r for r in rec if not r.get("incomplete")]
    return {"mode": mode, "kills": len(kills), "final_step": final_step,
            "wall_s": round(wall, 1), "useful_s": round(useful, 1), "goodput": round(useful / wall, 4),
            "recovery_median_s": round(statistics.median(r["total_s"] for r in done), 2) if done else None,
            "recovery_max_s": round(max(r["total_s"] for r in done), 2) if done else None,
            "kills_at_s": [round(t - first, 1) for t, _ in kills], "recoveries": rec}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=60.0, help="seconds between kills")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of training per mode")
    ap.add_argument("--modes", default="disk,async,snapshot")
    ap.add_argument("--ckpt_minutes", type=float, default=0.5, help="disk checkpoint interval (all modes)")
    ap.add_argument("--snapshot_every", type=int, default=10)
    ap.add_argument("--snapshot_dir", default="/dev/shm")
    ap.add_argument("--global_batch", type=int, default=256)
    ap.add_argument("--timeout_s", type=float, default=20.0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the run directories in this folder")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="phalanx-goodput-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for mode in args.modes.split(","):
            print(f"{mode}: {args.duration:g} s of training, a random rank killed every {args.every:g} s", flush=True)
            results.append(run_mode(mode, args, work))
    print(f"\n{'mode':<9} {'kills':>5} {'goodput':>8} {'recovery median':>16} {'max':>6}   detection / restart / "
          f"rendezvous / set-up / state load / first step (s), median")
    for r in results:
        done = [x for x in r["recoveries"] if not x.get("incomplete")]
        parts = " / ".join(f"{statistics.median(x[k] for x in done):.2f}" for k in
                           PARTS) if done else "-"
        print(f"{r['mode']:<9} {r['kills']:>5} {100 * r['goodput']:>7.1f}% {r['recovery_median_s'] or 0:>15.2f}s "
              f"{r['recovery_max_s'] or 0:>5.1f}s   {parts}")
    out = {"cpu": cpu_model(), "command": " ".join(["python", "benchmarks/goodput.py", *sys.argv[1:]]),
           "every_s": args.every, "duration_s": args.duration, "ckpt_minutes": args.ckpt_minutes,
           "snapshot_every": args.snapshot_every, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
