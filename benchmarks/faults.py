"""The fault matrix: what each fault costs a real `fit` (frames lost, seconds to stop, seconds to resume).

Runs ``python -m prunerl fit`` as a user would (Hopper, the default recipe unless overridden), injects
each fault into a fresh run dir, continues it with ``resume=auto`` and records:

- ``stop_s``: from the fault to the process's exit;
- ``frames_lost``: frames whose rollout was done before the fault but are not in the checkpoint the
  run resumed from (trained again); ``frames_finished_after_the_signal``: the rollout in progress,
  finished before stopping (signals);
- ``resume_to_first_update_s``: from the resume command's start to its first new metrics row's
  rollout being done (process start, imports, env and checkpoint load, one rollout);
- ``first_rollout_s`` of an uninterrupted start, for scale.

    python -m benchmarks.faults [--frames 40960] [--out benchmarks/results/faults.json]

Not a speed target: a table of costs. Say what else ran on the machine when you quote it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prunerl import atomic

REPO = Path(__file__).resolve().parents[1]


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in out if "train/frames" in r]


def _start(run: Path, over: list[str]) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "prunerl", "fit", f"hydra.run.dir={run}", "callbacks.progress=null",
           "logger=none", "resume=auto", *over]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), time.monotonic()


def _inode(run: Path) -> int | None:
    try:
        return (run / "metrics.jsonl").stat().st_ino
    except OSError:
        return None


def _wait_rows(child, run: Path, n: int, timeout: float = 900, not_inode: int | None = None) -> float:
    """Until ``run``'s metrics log has ``n`` rollout rows (in a new file, if ``not_inode`` is the old one's)."""
    t0 = time.monotonic()
    while len(_rows(run)) < n or (not_inode is not None and _inode(run) == not_inode):
        if child.poll() is not None:
            raise RuntimeError(f"fit exited ({child.returncode}) before {n} rollouts in {run}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(run)
        time.sleep(0.02)
    return time.monotonic()


def _ckpt_frames(run: Path) -> int | None:
    import torch

    p = run / "checkpoints" / "last.ckpt"
    return torch.load(p, map_location="cpu", weights_only=False)["prunerl"]["frames"] if p.is_file() else None


SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigusr1": signal.SIGUSR1, "sigusr2": signal.SIGUSR2}
#: kill9_after_timed_checkpoint: checkpoint.every_minutes=TIMED_MINUTES, killed two rollouts after the
#: first timed last.ckpt is on disk — what the time-based checkpoint bounds the loss to
TIMED_MINUTES = 0.25


def one(fault: str, root: Path, over: list[str], after_rollouts: int) -> dict:
    run = root / fault
    if fault == "kill9_after_timed_checkpoint":
        over = [*over, f"checkpoint.every_minutes={TIMED_MINUTES}"]
    child, t_start = _start(run, over)
    _wait_rows(child, run, after_rollouts)
    if fault == "kill9_after_timed_checkpoint":
        while _ckpt_frames(run) is None and child.poll() is None:
            time.sleep(0.2)
        _wait_rows(child, run, len(_rows(run)) + 2)
    frames_at_fault = _rows(run)[-1]["train/frames"]
    t_fault = time.monotonic()
    if fault.startswith("kill9"):
        child.kill()
    else:
        child.send_signal(SIGNALS[fault])
    code = child.wait()
    stop_s = time.monotonic() - t_fault
    resumed_from = _ckpt_frames(run) or 0
    rows_before = len([r for r in _rows(run) if r["train/frames"] <= resumed_from])
    # rows past the checkpoint: the resumed run rewrites metrics.jsonl without them (a new file); no
    # checkpoint: the run dir is moved aside and restarted (a new file too)
    old = _inode(run) if rows_before == 0 or len(_rows(run)) > rows_before else None
    child, t0 = _start(run, over)
    t_first = _wait_rows(child, run, rows_before + 1, not_inode=old)
    child.kill()
    child.wait()
    return {"fault": fault, "exit_code": code, "frames_at_fault": frames_at_fault,
            "checkpoint_frames": resumed_from, "frames_lost": max(0, frames_at_fault - resumed_from),
            "frames_finished_after_the_signal": max(0, resumed_from - frames_at_fault),
            "stop_s": round(stop_s, 2), "resume_to_first_update_s": round(t_first - t0, 2),
            "first_rollout_of_a_fresh_start_s": None}


def diverged(root: Path, over: list[str]) -> dict:
    """A run that diverges at its first update (``algo.lr=1e30``): its exit code, summary and last good checkpoint."""
    run = root / "diverged"
    child, t0 = _start(run, [*over, "algo.lr=1e30"])
    code = child.wait()
    summary = json.loads((run / "summary.json").read_text())
    return {"fault": "nan_inf (algo.lr=1e30)", "exit_code": code, "stop_s": round(time.monotonic() - t0, 2),
            "status": summary.get("status"), "diverged_at_update": summary.get("diverged_at_update"),
            "diverged_term": summary.get("diverged_term"), "last_good_checkpoint": summary.get("last_good_checkpoint"),
            "frames_lost": "the run ends (resuming would diverge again: deterministic)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after", type=int, default=6, help="rollouts trained before the fault")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "faults.json"))
    ap.add_argument("overrides", nargs="*", default=[], help="fit overrides (default: the default config)")
    args = ap.parse_args()
    over = ["total_frames=409600", *args.overrides]   # the default checkpoints: every 25 rollouts, every 10 min
    root = Path(tempfile.mkdtemp(prefix="prunerl-faults-"))
    try:
        fresh = root / "fresh"
        child, t0 = _start(fresh, over)
        t1 = _wait_rows(child, fresh, 1)
        child.kill()
        child.wait()
        rows = []
        for fault in ("sigterm", "sigint", "sigusr1", "sigusr2", "kill9", "kill9_after_timed_checkpoint"):
            r = one(fault, root, over, args.after)
            r["first_rollout_of_a_fresh_start_s"] = round(t1 - t0, 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
        rows.append(diverged(root, over))
        print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"command": "python -m benchmarks.faults " + " ".join(sys.argv[1:]), "overrides": over,
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows,
              "note": "stop_s includes finishing the rollout in progress (signals) — ~0 for kill -9; "
                      "frames_lost is what the resumed run trains again; timings depend on what else runs"}
    atomic.write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
