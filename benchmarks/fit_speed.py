"""End-to-end speed of the default ``python -m prunerl fit``: this tree against an earlier commit.

Issue 11 asks for the default fit (Hopper, κ = 0.3, 256x256, both cores) at ≥ 2× the frames per
second it had before the speed work, measured against that commit in one run. This script checks
out ``--baseline`` (default ``a336e3d``: main just before the mujoco engine and the fast SA loop were
merged) into a temporary git worktree and runs the very same command in both trees, the runs
interleaved (order rotating each repeat, so background load hurts both alike):

    python -m prunerl fit seed=S total_frames=F logger=none hydra.run.dir=<tmp>

The default recipe changed since ``a336e3d`` (Hopper: minibatches of 128 instead of 64, 5 SA steps
of ε/5 instead of 10 of ε/10), so ``head`` vs ``baseline`` is what a user of the default fit sees —
code and recipe together. A third variant, ``head_baseline_recipe``, runs this tree with
``BASELINE_RECIPE`` (the baseline's recipe pinned on the command line): it against ``baseline`` is
the code's own speed-up.

— the default config otherwise, end-of-run evaluation included (it is part of what a user waits
for). Figures per run: the process's wall time (start to exit), the frames, frames / wall, and the
run's own ``summary.json`` figures (``wall_time_s``, ``collect_time_s``, ``sps``). The result is the
ratio of medians over ``--repeats``; per-repeat ratios too. Frames are the same in both trees (the
rollout size is the same), and the two trees' runs are not expected to be bit-identical (the fast
SA loop rounds differently), only the same work.

    python benchmarks/fit_speed.py [--baseline a336e3d] [--frames 102400] [--repeats 3]
                                   [--out benchmarks/results/fit_speed.json]

Needs an idle machine (the default fit uses both cores) and git (for the baseline worktree).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, load_average, machine_info, write_json  # noqa: E402

TARGET = 2.0
#: a336e3d's Hopper recipe, pinned in this tree for the code-only comparison
BASELINE_RECIPE = ("algo.sa.steps=10", "algo.sa.step_ratio=0.1", "algo.minibatches=32")


def _run_fit(tree: Path, run_dir: Path, frames: int, seed: int, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "prunerl", "fit", f"seed={seed}", f"total_frames={frames}", "logger=none",
           f"hydra.run.dir={run_dir}", *extra]
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fit failed in {tree} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": wall, "frames": summary["frames"], "fps": summary["frames"] / wall,
            "summary_wall_time_s": summary.get("wall_time_s"), "collect_time_s": summary.get("collect_time_s"),
            "sps": summary.get("sps"), "clean_return": summary.get("clean_return")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="a336e3d", help="git revision to compare against")
    p.add_argument("--frames", type=int, default=102_400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fit_speed.json")
    args = p.parse_args(argv)
    if args.frames <= 0 or args.repeats <= 0:
        p.error(f"--frames {args.frames} and --repeats {args.repeats} must be positive")
    rev = subprocess.run(["git", "rev-parse", "--verify", f"{args.baseline}^{{commit}}"], cwd=REPO,
                         capture_output=True, text=True)
    if rev.returncode != 0:
        p.error(f"--baseline {args.baseline!r} is not a commit of {REPO}")
    base_sha = rev.stdout.strip()
    head_sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "prunerl", "conf", "callbacks"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())

    with tempfile.TemporaryDirectory(prefix="fit_speed_") as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_sha], cwd=REPO, check=True,
                       capture_output=True)
        try:
            trees = {"head": (REPO, ()), "head_baseline_recipe": (REPO, BASELINE_RECIPE), "baseline": (base_tree, ())}
            runs: dict[str, list[dict]] = {k: [] for k in trees}
            load_before = load_average()
            for r in range(args.repeats):
                order = list(trees)[r % len(trees):] + list(trees)[:r % len(trees)]   # rotating
                for name in order:
                    tree, extra = trees[name]
                    res = _run_fit(tree, tmp / f"{name}_{r}", args.frames, args.seed, extra)
                    runs[name].append(res)
                    print(f"repeat {r} {name:8s} {res['frames']:,} frames in {res['wall_s']:.1f} s "
                          f"= {res['fps']:,.0f} frames/s (collection {res['collect_time_s']:.1f} s, "
                          f"clean {res['clean_return']:.0f})", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True)

    med = {k: statistics.median(x["fps"] for x in v) for k, v in runs.items()}
    ratio = med["head"] / med["baseline"]
    per_repeat = [h["fps"] / b["fps"] for h, b in zip(runs["head"], runs["baseline"])]
    code_ratio = med["head_baseline_recipe"] / med["baseline"]
    out = {
        "benchmark": "fit_speed",
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO)),
                                                                  *(argv if argv is not None else sys.argv[1:])]),
        "fit_command": f"python -m prunerl fit seed={args.seed} total_frames={args.frames} logger=none hydra.run.dir=…",
        "head": head_sha, "head_dirty": dirty, "baseline": base_sha,
        "baseline_recipe_overrides": list(BASELINE_RECIPE),
        "runs": runs, "median_fps": med, "speedup": ratio, "speedup_per_repeat": per_repeat,
        "speedup_code_only": code_ratio,
        "speedup_code_only_per_repeat": [h["fps"] / b["fps"] for h, b in zip(runs["head_baseline_recipe"],
                                                                              runs["baseline"])],
        "target": TARGET, "met": ratio >= TARGET,
        "load_average_before": load_before, "load_average_after": load_average(), "machine": machine_info(),
    }
    write_json(args.out, out)
    print(f"head {med['head']:,.0f} vs baseline {med['baseline']:,.0f} frames/s = {ratio:.2f}x "
          f"(target ≥ {TARGET}x: {'met' if ratio >= TARGET else 'not met'}); with the baseline's recipe "
          f"{med['head_baseline_recipe']:,.0f} = {code_ratio:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
