"""Atomic file writes: a crash at any moment — ``kill -9`` included — leaves under the final name
either the previous file or the new one, never a half-written file.

The content goes to a temporary file in the same directory (so the rename cannot cross file
systems), is flushed to disk (fsync), and is renamed onto the final name with ``os.replace``
(atomic on POSIX); the directory is fsynced so the rename itself survives a power loss. A failed
write removes its temporary file and leaves the previous file untouched.

One home for every file PruneRL writes whole: config.yaml and summary.json (``rundir``),
checkpoints (:class:`AtomicCheckpointIO`, given to the Lightning Trainer), evaluation JSON, the
Robust Sarsa caches, the adversary's curve and every report output. ``metrics.jsonl`` is appended
to, a row at a time, and is not rewritten.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse to open or fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it whole; on leaving the block it is fsynced
    and renamed onto ``path``. On an error the temporary file is removed and ``path`` is untouched.

    The temporary name is hidden (``.<name>.<random>.tmp``) and does not end in the final suffix,
    so a directory scan for ``*.ckpt`` or ``summary.json`` never sees it; ``keep_suffix=True``
    appends the suffix (for writers that pick the format from it, such as ``savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                suffix=".tmp" + (path.suffix if keep_suffix else ""))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the final file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    remove_stale_temporaries(path)


#: a temporary file of the same final name untouched for this long was left by a writer that died
#: (``kill -9`` mid-write); writes of PruneRL's files take seconds
STALE_AFTER_S = 3600.0


def remove_stale_temporaries(path: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files an interrupted write of ``path`` left beside it (a killed writer
    cannot remove its own), so a job that keeps crashing does not fill its disk one checkpoint at a
    time; those of a write still in progress (modified within ``older_than_s``) are kept."""
    import time

    path, removed = Path(path), []
    now = time.time()
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, **kwargs)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, each checkpoint written whole or not at all (``Trainer(plugins=[...])``)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)
