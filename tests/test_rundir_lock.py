"""Two fits into one run dir at once: the second is refused (or skipped in a sweep), never interleaved."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prunerl.config import ConfigError
from prunerl.fit import fit
from prunerl.rundir import RunDir, RunDirBusy

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from prunerl.rundir import RunDir
    with RunDir(sys.argv[1]).lock():
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def held(tmp_path):
    """A run dir locked by another process (as a running fit holds it)."""
    run = tmp_path / "run"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_fit_into_a_run_dir_in_use_is_refused_and_writes_nothing(small_cfg, held):
    run, proc = held
    with pytest.raises(ConfigError, match=rf"hydra.run.dir={run} is in use by a running fit \(pid {proc.pid}\)"):
        fit(small_cfg(run_dir=run))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_sweep_skips_a_run_dir_in_use(small_cfg, held):
    run, _ = held
    out = fit(small_cfg("skip_finished=true", run_dir=run))
    assert out == {"skipped": True, "busy": True, "run_dir": str(run)}
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_the_lock_is_released_when_its_holder_dies(small_cfg, held):
    run, proc = held
    proc.kill()
    proc.wait()
    with RunDir(run).lock():   # a crashed holder never leaves the dir locked
        pass
    summary = fit(small_cfg("callbacks.evaluation=null", run_dir=run))
    assert summary["status"] == "finished"


def test_the_lock_follows_the_path_when_an_unfinished_run_is_moved_aside(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        (run.path / "metrics.jsonl").write_text("{}\n")
        moved = run.move_aside()
        assert (run.path / ".lock").exists() and not (moved / ".lock").exists()
        with pytest.raises(RunDirBusy):
            with RunDir(run.path).lock():   # still held: a second process is refused at the same path
                pass
