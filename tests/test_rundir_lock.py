"""Two fits into one run dir at once: the second is refused (or skipped in a sweep), never interleaved."""

import errno
import os
import re
import socket
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
    host = re.escape(socket.gethostname())   # on a cluster a bare pid means little: the holder's host too
    with pytest.raises(ConfigError, match=rf"hydra.run.dir={run} is in use by a running fit \(pid {proc.pid} on {host}\)"):
        fit(small_cfg(run_dir=run))
    assert not run.exists() or not any(run.iterdir())   # the lock is beside the run dir, not in it


def test_a_sweep_skips_a_run_dir_in_use(small_cfg, held):
    run, _ = held
    out = fit(small_cfg("skip_finished=true", run_dir=run))
    assert out == {"skipped": True, "busy": True, "run_dir": str(run)}
    assert not run.exists() or not any(run.iterdir())


def test_the_lock_is_released_when_its_holder_dies(small_cfg, held):
    run, proc = held
    proc.kill()
    proc.wait()
    with RunDir(run).lock():   # a crashed holder never leaves the dir locked
        pass
    summary = fit(small_cfg("callbacks.evaluation=null", run_dir=run))
    assert summary["status"] == "finished"


def test_the_lock_stays_with_the_path_when_an_unfinished_run_is_moved_aside(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        run.path.mkdir()
        (run.path / "metrics.jsonl").write_text("{}\n")
        moved = run.move_aside()
        assert not run.path.exists() and sorted(p.name for p in moved.iterdir()) == ["metrics.jsonl"]
        with pytest.raises(RunDirBusy):
            with RunDir(run.path).lock():   # still held at the run dir's path, with no window between
                pass
    assert not run.lock_file.exists()   # removed on release
    with RunDir(run.path).lock():
        pass


def test_a_lock_file_removed_by_its_releasing_holder_is_not_held_twice(tmp_path, monkeypatch):
    """The unlink-on-release race: this process opens the lock file, its holder releases (removes
    it) and a third process creates and locks a new one before this process's flock — which then
    succeeds on the removed file. It must see that and be refused, not hold the run dir twice."""
    import fcntl
    import os

    import prunerl.rundir as rundir

    run = RunDir(tmp_path / "run")
    run.lock_file.write_text("1")
    real_flock, others = fcntl.flock, []

    def released_meanwhile(fd, op):
        if not others:
            run.lock_file.unlink()   # the holder releases
            others.append(os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o644))
            real_flock(others[0], fcntl.LOCK_EX)   # a third fit locks the new file
        return real_flock(fd, op)

    monkeypatch.setattr(rundir.fcntl, "flock", released_meanwhile)
    with pytest.raises(RunDirBusy):
        with run.lock():
            pass
    os.close(others[0])


def test_a_run_dir_reached_through_a_symlink_has_the_lock_of_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with RunDir(tmp_path / "real").lock():
        with pytest.raises(RunDirBusy):
            with RunDir(tmp_path / "link").lock():
                pass


@pytest.mark.parametrize("code", ["ENOSYS", "EOPNOTSUPP", "ENOLCK"])
def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys, code):
    """Lustre mounted noflock and some NFS setups refuse flock: a warning, not a crash before training."""
    import prunerl.rundir as rundir

    def unsupported(fd, op):
        raise OSError(getattr(errno, code), f"flock: {code}")

    monkeypatch.setattr(rundir.fcntl, "flock", unsupported)
    run = RunDir(tmp_path / "run")
    with run.lock():
        assert run.lock_file.read_text() == f"{socket.gethostname()}:{os.getpid()}"
    assert "does not support flock" in capsys.readouterr().out and not run.lock_file.exists()

    def broken(fd, op):   # any other error is not "unsupported": it is raised
        raise OSError(errno.EBADF, "flock: EBADF")

    monkeypatch.setattr(rundir.fcntl, "flock", broken)
    with pytest.raises(OSError):
        with run.lock():
            pass
