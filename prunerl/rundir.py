"""The run directory contract (DESIGN.md): config.yaml, checkpoints/, metrics.jsonl, summary.json.

One home for writing it: ``fit`` uses :class:`RunDir`; the report and benchmarks read it with
:func:`read_summary` / :func:`read_metrics`.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from prunerl import atomic
from prunerl.errors import ConfigError


class RunDirBusy(ConfigError):
    """The run dir is held by another running ``fit``."""


SUMMARY_KEYS = ("frames", "wall_time_s", "sps", "train_return", "clean_return", "attack_returns",
                "sparsity", "lipschitz_surrogate", "certified_bound", "seed", "env_id", "kappa",
                "pruning_method", "final_sparsity")
RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints")
# flock refused by the file system (Lustre mounted noflock, some NFS setups): run without the lock
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def lock_file(self) -> Path:
        """``<parent>/.<run dir name>.lock`` of the resolved run dir (a run dir reached through a
        symlink has the lock of its target): beside the run dir, not in it, so that moving an
        unfinished run aside (:meth:`move_aside`) never moves the lock a running ``fit`` holds."""
        path = self.path.resolve()
        return path.with_name(f".{path.name}.lock")

    @contextlib.contextmanager
    def lock(self):
        """Hold this run dir for one ``fit``: a second ``fit`` into it while the first runs is refused
        (never interleaved). An advisory ``flock`` on :attr:`lock_file`, which names the holder
        (``host:pid``): the kernel drops it when the holder exits, however it exits, so a crashed
        run never leaves the dir locked. The file is removed on release; a process that locked a
        file already unlinked retries on the new one. A file system without ``flock`` runs
        unlocked, with a warning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = self.lock_file   # fixed while held: the run dir may be moved aside meanwhile
        while True:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                host, _, pid = os.pread(fd, 256, 0).decode(errors="replace").strip().rpartition(":")
                os.close(fd)
                who = f"pid {pid} on {host}" if host else f"pid {pid}" if pid else "another process"
                raise RunDirBusy(f"hydra.run.dir={self.path} is in use by a running fit ({who}); "
                                 "wait for it to finish or choose another directory") from None
            except OSError as e:
                if e.errno not in NO_FLOCK:
                    os.close(fd)
                    raise
                print(f"warning: {lock_file.parent} does not support flock ({e.strerror}); running without "
                      f"the run dir lock — make sure no other fit writes to {self.path}", flush=True)
                break
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)   # the previous holder removed this file as we locked it: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}".encode(), 0)
            yield self
        finally:
            with contextlib.suppress(OSError):
                lock_file.unlink()   # while still held: no one can hold this inode meanwhile
            os.close(fd)   # releases the lock

    def probe(self, min_free_mb: float = 0) -> None:
        """Find an unwritable or full run dir before training starts: create it, write, fsync and
        remove a probe file, and check the free space (``checkpoint.min_free_mb``). On failure a
        :class:`ConfigError` naming the directory; a directory this probe created is removed."""
        missing = []
        p = self.path.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise ConfigError(f"hydra.run.dir={self.path} cannot be created: {p} is a file, not a directory")

        def undo() -> None:
            for d in missing:   # deepest first
                with contextlib.suppress(OSError):
                    d.rmdir()

        probe = self.path / f".write-probe-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"\0" * 65536)
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as e:
            undo()
            raise ConfigError(f"hydra.run.dir={self.path} is not writable ({e.strerror or e}); "
                              "choose a directory this user can write to") from None
        free = shutil.disk_usage(self.path).free / 2**20
        if free < min_free_mb:
            undo()
            raise ConfigError(f"hydra.run.dir={self.path} has {free:,.0f} MiB free, less than "
                              f"checkpoint.min_free_mb={min_free_mb:g}; free some space or choose another directory")

    def truncate_metrics(self, after_step: int) -> int:
        """Drop metrics.jsonl rows logged after update ``after_step`` (work a resumed run redoes) and a
        torn last row; return how many rows were dropped. Atomic: the old file stays until the new one is whole."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return 0
        lines = path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step") is None or row["step"] <= after_step:
                keep.append(line)
        if len(keep) != len(lines):
            atomic.write_text(path, "".join(f"{line}\n" for line in keep))
        return len(lines) - len(keep)

    def existing_run(self) -> list[str]:
        """What of a previous run already stands here (a new run must not overwrite it)."""
        return [m for m in RUN_MARKERS if (self.path / m).exists()]

    def move_aside(self) -> Path:
        """Rename this run dir to ``<name>.partial-<k>`` (nothing written is lost); return the new path."""
        k = 0
        while (target := self.path.with_name(f"{self.path.name}.partial-{k}")).exists():
            k += 1
        self.path.rename(target)   # the lock (beside the run dir, keyed by its path) stays held
        return target

    def write_config(self, cfg: DictConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def write_summary(self, summary: dict[str, Any]) -> Path:
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise KeyError(f"summary.json lacks keys {missing}")
        out = self.path / "summary.json"
        atomic.write_text(out, json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n")
        return out


def newest_checkpoint(folder: str | Path) -> tuple[tuple[Path, int] | None, list[tuple[Path, str]]]:
    """The run's newest good resume checkpoint in ``folder`` (``last.ckpt`` and the periodic
    ``rollout*.ckpt``; not the evaluation's victim copies) as ``(path, update t)``, and the files
    passed over with why (truncated, unreadable, not PruneRL's)."""
    import torch

    folder = Path(folder)
    found, bad = [], []
    if not folder.is_dir():
        return None, bad
    for path in sorted([*folder.glob("last.ckpt"), *folder.glob("rollout*.ckpt")]):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            found.append((int(ckpt["global_step"]), int(ckpt["prunerl"]["frames"]), path))
            del ckpt
        except Exception as e:  # noqa: BLE001 — any unreadable file is passed over, and said
            bad.append((path, f"{type(e).__name__}: {str(e)[:80]}"))
    if not found:
        return None, bad
    step, _, path = max(found, key=lambda f: (f[0], f[2].name == "last.ckpt"))
    return (path, step), bad


def resume_checkpoint(folder: str | Path) -> str:
    """``resume=DIR``: the newest good checkpoint of run dir ``DIR`` (or of its ``checkpoints/``
    folder given directly), or a :class:`ConfigError` saying why there is none."""
    folder = Path(folder)
    ckpts = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    found, bad = newest_checkpoint(ckpts)
    if found is None:
        why = "; ".join(f"{p.name}: {w}" for p, w in bad) or "no last.ckpt or rollout*.ckpt in it"
        raise ConfigError(f"resume={folder} holds no checkpoint to continue from ({why}); "
                          "give a run dir with checkpoints/, a checkpoint file, or auto")
    return str(found[0])


def continue_logs(loggers, step: int) -> None:
    """A run resumed in place from the checkpoint of update ``step``: the loggers' own files go on
    where that checkpoint left them. Lightning's CSVLogger would delete ``csv/metrics.csv``; here
    its rows up to ``step`` are kept (later ones are redone by the resumed run). A W&B logger
    logs under the id of the run it logged to (``resume="allow"``), but W&B keeps what it has: the
    rollouts redone since the checkpoint are logged again (W&B's own step counts on, so they
    appear twice, with equal values and the same ``trainer/global_step``), as in TensorBoard,
    which starts a new event file beside the old ones. Offline, each part is its own
    ``wandb/offline-run-*`` folder, synced separately. (Not tested against a W&B server.)"""
    for logger in loggers:
        if isinstance(logger, CSVLogger) and logger._experiment is None:
            logger._experiment = _ContinuedCSV(logger.log_dir, step)
        elif isinstance(logger, WandbLogger) and logger._experiment is None:
            run_id = _wandb_run_id(Path(logger.save_dir or "."))
            if run_id is not None:
                logger._wandb_init.update(id=run_id, resume="allow")


def _wandb_run_id(save_dir: Path) -> str | None:
    """The id of the newest W&B run written under ``save_dir/wandb`` (``[offline-]run-<time>-<id>``)."""
    runs = sorted((save_dir / "wandb").glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


class _ContinuedCSV(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv`` (its rows up to ``step`` kept)."""

    def __init__(self, log_dir: str, step: int) -> None:
        self._keep_step = step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:   # where Lightning deletes the old file
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        keep = [r for r in rows if not r.get("step") or float(r["step"]) <= self._keep_step]
        self.metrics_keys = sorted(keys)
        if len(keep) != len(rows) or keys != self.metrics_keys:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.metrics_keys)
            w.writeheader()
            w.writerows(keep)
            atomic.write_text(path, buf.getvalue())


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return x


def format_summary(summary: dict, run_dir: str | Path | None = None) -> str:
    """What ``fit`` prints at the end: returns clean and per attack, sparsity, L̃, certified bound."""

    def num(x, fmt="{:,.0f}"):
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)

    ev = summary.get("evaluation") or {}
    lines = [f"{summary.get('env_id', '?')}  κ={summary.get('kappa')}  seed={summary.get('seed')}  "
             f"{num(summary.get('frames'))} frames in {num(summary.get('wall_time_s'))} s "
             f"({num(summary.get('sps'))} frames/s)",
             f"  {'train':<16}{num(summary.get('train_return')):>9}   (mean of the last episodes, sampled actions)"]
    if summary.get("clean_return") is not None:
        mode = "a = μ(ŝ)" if ev.get("deterministic", True) else "sampled actions"
        lines.append(f"  {'clean':<16}{num(summary['clean_return']):>9}   ({ev.get('episodes', '?')} episodes, {mode}, "
                     f"attacks at ε = {ev.get('eps', '?')})")
        attacks = summary.get("attack_returns") or {}
        for name, r in attacks.items():
            lines.append(f"  {name:<16}{num(r):>9}")
        if attacks:
            worst = min(attacks, key=attacks.get)
            lines.append(f"  {'robust (worst)':<16}{num(attacks[worst]):>9}   ({worst}); "
                         f"average over attacks {num(sum(attacks.values()) / len(attacks))}")
    sp = summary.get("sparsity") or {}
    if sp:
        lines.append(f"  sparsity {num(sp.get('global'), '{:.2f}')} (actor {num(sp.get('actor'), '{:.2f}')}, "
                     f"critic {num(sp.get('critic'), '{:.2f}')}), pruning={summary.get('pruning_method')}")
    if summary.get("lipschitz_surrogate") is not None:
        ball = summary.get("certified_bound_ball")
        eps = summary.get("certified_bound_eps", summary.get("eps"))
        ball = "" if ball is None else f" (ℓ∞ ball, ε = {eps})" if ball == "linf" else f" ({ball} ball)"
        lines.append(f"  L̃ actor {num(summary['lipschitz_surrogate'], '{:.3g}')}, certified bound "
                     f"{num(summary.get('certified_bound'), '{:.3g}')}{ball}")
    if run_dir is not None:
        lines.append(f"  -> {run_dir}")
    return "\n".join(lines)


def read_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger(Logger):
    """The run directory's own metrics log: one JSON object per logged step, appended.

    Always attached, whatever ``logger=`` says, so every run has a machine-readable log.
    """

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.file = Path(run_dir) / "metrics.jsonl"

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.file.open("a") as f:
            f.write(json.dumps(row) + "\n")
