"""The command line: ``python -m prunerl {fit,evaluate,report,export} [overrides]`` and ``--help``.

Each command is a thin Hydra wrapper around a plain function (``fit(cfg)``, ``evaluate(cfg)``,
``report(...)``, ``export(cfg)``).
Bad input raises :class:`~prunerl.config.ConfigError`; the CLI prints its one-line message and
exits with status 2 before anything is written.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from prunerl.config import ConfigError
from prunerl.preemption import Interrupted

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

COMMANDS = {
    "fit": ("config", "train PPO(+SA) on a MuJoCo task (Hydra overrides: env=, algo.kappa=, total_frames=, ...)"),
    "evaluate": ("evaluate", "evaluate a checkpoint (or a directory of them) clean and under attacks: checkpoint=PATH "
                 "[attacks=[random,critic,mad,rs,optimal]] [episodes=N] [eps=E] [deterministic=true|false]"),
    "report": ("report", "sweet-spot tables, figures and a verdict from a folder of runs: runs=DIR [out=DIR] "
               "[normalize=sa|same_kappa] [baseline_kappa=K] [resamples=N] [ci=0.95]"),
    "export": ("export", "the deterministic policy μ(s), normaliser folded in, as one file: checkpoint=PATH "
               "[format=onnx|torchscript] [out=PATH] (neuron-pruned policies come out smaller)"),
}

GROUPS_HELP = """config groups (choose with GROUP=OPTION):
  env         hopper (default) | walker2d | halfcheetah | ant | inverted_pendulum
  algo        ppo (PPO + SA regulariser; algo.kappa=0 turns SA off)
  pruning     magnitude (default) | none | random | magnitude_ste | saliency | neuron (whole units)
              (pruning.final_sparsity, pruning.burn_in, pruning.interval, pruning.allocation, pruning.scope)
  evaluation  default (evaluation.attacks=[random,critic,mad,rs,optimal], evaluation.episodes=N)
  logger      csv (default) | none | tensorboard | wandb   (W&B runs offline without a key)
  trainer     default (lightning.Trainer arguments)
  callbacks   default (named _target_ mappings; callbacks.NAME=null drops one)
  experiment  paper_hopper (the paper's 50M-frame GPU run), adversary (train an optimal attacker)
  sweep       baseline | methods | interval (multirun presets: python -m prunerl fit -m sweep=methods)
  hydra/launcher  local (joblib, parallel) | slurm (submitit)

common keys: total_frames=N seed=S device=auto|cpu|cuda resume=PATH hydra.run.dir=DIR, -m for multirun
show a composed config: python -m prunerl fit --cfg job"""


def usage() -> str:
    lines = ["usage: python -m prunerl COMMAND [hydra overrides]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n\n" + GROUPS_HELP


def _run(command: str, cfg: DictConfig):
    try:
        if command == "fit":
            from prunerl.fit import fit

            from prunerl.divergence import EXIT_DIVERGED
            from prunerl.preemption import EXIT_INTERRUPTED, requeue_on_slurm
            from prunerl.rundir import format_summary

            _refuse_resume_auto_in_a_new_dir(cfg)
            summary = fit(cfg)
            if summary.get("busy"):
                print(f"skipped: {summary['run_dir']} is being trained by another fit", flush=True)
                return summary
            if summary.get("status") == "interrupted":
                print(f"interrupted by {summary['interrupted_by']} at {summary['frames']:,} frames; checkpoint: "
                      f"{summary['resume']}\ncontinue with: python -m prunerl fit resume=auto "
                      f"hydra.run.dir={cfg.run_dir} [the same overrides] (in place), or "
                      f"resume={summary['resume']} [the same overrides] (into a new run dir)", flush=True)
                requeue_on_slurm(cfg)
                sys.exit(EXIT_INTERRUPTED)
            if summary.get("status") == "diverged":
                good = summary.get("last_good_checkpoint")
                print(f"error: {summary['error']} — the run stopped there; summary.json says \"diverged\"; "
                      f"last good checkpoint: {good or 'none (it diverged before the first)'}",
                      file=sys.stderr, flush=True)
                if not _multirun():   # a sweep goes on with its other runs
                    sys.exit(EXIT_DIVERGED)
                return summary
            print(("skipped (already finished): " if summary.get("skipped") else "done: ")
                  + format_summary(summary, cfg.run_dir), flush=True)
            return summary
        if command == "report":
            return _report(cfg)
        if command == "export":
            from prunerl.export import export

            return export(cfg)
        from prunerl.evaluate import evaluate

        return evaluate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if command == "fit":
            _remove_made_run_dir(cfg)
        sys.exit(2)
    except Interrupted as e:   # evaluate: a learned adversary's training was preempted (it resumes)
        from prunerl.preemption import EXIT_INTERRUPTED

        print(f"interrupted by {e}; run the same command again to continue (finished attack models are cached)",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _refuse_resume_auto_in_a_new_dir(cfg: DictConfig) -> None:
    """``resume=auto`` continues the run in ``hydra.run.dir``; with a timestamped one (the default)
    that is a new directory on every call, so the run would start from scratch without a word."""
    from hydra.core.hydra_config import HydraConfig

    from prunerl.preemption import timestamped_run_dir

    if cfg.get("resume") != "auto" or not HydraConfig.initialized() or _multirun():
        return
    why = timestamped_run_dir(HydraConfig.get())
    if why is not None:
        raise ConfigError(f"resume=auto needs hydra.run.dir=<the run dir>: {why} (a new directory on every call, "
                          "with nothing to continue); give the run's dir, or resume=<RUN_DIR> to continue it "
                          "into a new run dir")


def _remove_made_run_dir(cfg: DictConfig) -> None:
    """A refused ``fit`` leaves nothing: Hydra makes the run dir, and its missing parents (e.g.
    ``outputs/hopper/``), before any check of ours; remove those it made, if empty (a dir that
    existed before the command stays)."""
    made = _MADE["dirs"]   # RUN mode: noted by MadeRunDir, deepest first
    if made is None:   # a multirun job: its own run dir, unless given and there before
        try:
            run_dir = Path(str(cfg.run_dir))
        except Exception:  # noqa: BLE001 — no resolvable run dir: nothing to remove
            return
        if str(run_dir) in _EXISTED or run_dir.resolve() in {Path(p).resolve() for p in _EXISTED}:
            return
        made = [run_dir]
    for d in made:
        try:
            d.rmdir()   # only an empty directory
        except OSError:
            break


class MadeRunDir(Callback):
    """A Hydra callback (conf/config.yaml ``hydra.callbacks``): notes which of ``hydra.run.dir`` and
    its parents do not exist yet, just before Hydra makes them, for :func:`_remove_made_run_dir`."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _MADE["dirs"] = None
        try:
            d = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        except Exception:  # noqa: BLE001 — an unresolvable run dir fails in Hydra itself, said there
            return
        missing = []
        while not d.exists():
            missing.append(d)
            d = d.parent
        _MADE["dirs"] = missing


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _report(cfg: DictConfig) -> dict:
    from prunerl.report import report

    if cfg.runs is None:
        raise ConfigError("runs=DIR is required (a folder of run directories, e.g. a multirun folder)")
    runs = Path(str(cfg.runs))
    if not runs.is_dir():
        raise ConfigError(f"runs={cfg.runs} does not exist" if not runs.exists()
                          else f"runs={cfg.runs} is a file, not a directory")
    out = Path(str(cfg.out)) if cfg.out is not None else runs / "report"
    result = report(runs, out, normalize=str(cfg.normalize), baseline_kappa=cfg.baseline_kappa,
                    resamples=cfg.resamples, ci_level=cfg.ci, seed=cfg.bootstrap_seed)
    n_dup = sum(len(o) for _, o, _ in result["duplicates"])
    print(f"{result['runs']} runs ({n_dup} duplicate folders counted once, {len(result['skipped'])} skipped, "
          f"{len(result['problems'])} problems) -> {out / 'summary.md'} ({len(result['figures'])} figures)")
    for v in result["verdicts"]:
        print(f"  {v['setting']} κ={v['kappa']:g} {v['method']}: {v['verdict_text']}")
    for path, why in result["problems"]:
        print(f"  problem: {path}: {why}")
    return result


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; allowed: {list(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    config_name = COMMANDS[command][0]
    for arg in rest:   # Hydra creates the run dir before any check of ours: refuse a bad one first
        if arg.startswith("hydra.run.dir="):
            if Path(arg.split("=", 1)[1]).expanduser().exists():
                _EXISTED.add(arg.split("=", 1)[1])
            why = _uncreatable(arg.split("=", 1)[1])
            if why:
                print(f"error: {arg} cannot be used: {why}; choose a directory this user can create", file=sys.stderr)
                sys.exit(2)
    sys.argv = [f"prunerl {command}", *rest]
    # Hydra reports a bad command line (unknown key, unknown group option, unparsable override) in
    # several lines and exits 1; hold its stderr until the command starts, and say it in one line.
    _HELD.update(real=sys.stderr, held=io.StringIO(), started=False)
    _MADE["dirs"] = None
    sys.stderr = _HELD["held"]
    try:
        # a top-level function and a str: launchers that pickle the task (joblib, submitit) can
        task = functools.partial(_task, command)
        task.__module__ = "prunerl"   # Hydra names the app (--help, hydra.job.name) after the task's module
        hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(task)()
    except SystemExit as e:
        if not _HELD["started"] and e.code not in (0, None):
            _release()
            text = _HELD["held"].getvalue()
            if not any(m in text for m in HYDRA_INPUT_ERRORS):   # not the command line: say it as it was
                sys.stderr.write(text)
                raise
            bad = _unparsable(rest) if "override" in text and ": error: " not in text else None
            print(f"error: {bad or hydra_error_line(text)}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        if not _HELD["started"]:   # e.g. --help, --cfg job: nothing failed, pass on what was said
            _release()
            sys.stderr.write(_HELD["held"].getvalue())


# Hydra's reports of a bad command line (composition, overrides, argparse); anything else is not bad input
HYDRA_INPUT_ERRORS = ("Could not override", "Could not find", "Could not load", "Error parsing override",
                      "no viable alternative", "mismatched input", "extraneous input", ": error: ",
                      "is not in struct", "Could not append")
_HELD: dict = {"real": None, "held": None, "started": True}
_EXISTED: set[str] = set()   # run dirs given on the command line that existed before it ran
_MADE: dict = {"dirs": None}  # hydra.run.dir and its parents that Hydra made for this command (MadeRunDir)


def _release() -> None:
    """Give stderr back (once) and pass on what Hydra said meanwhile."""
    if not _HELD["started"]:
        _HELD["started"] = True
        sys.stderr = _HELD["real"]


def _task(command: str, cfg: DictConfig):
    if not _HELD["started"]:   # in this process: the command started, stderr goes back
        held = _HELD["held"].getvalue()
        _release()
        sys.stderr.write(held)
    return _run(command, cfg)


def _unparsable(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar cannot parse, named, with the parser's complaint."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        if o.startswith("-"):
            continue
        try:
            parser.parse_overrides([o])
        except Exception as e:  # noqa: BLE001 — Hydra's OverrideParseException and kin
            why = str(e).splitlines()[0].rstrip(".")
            return (f"{o!r} is not a valid override ({why}); write KEY=VALUE, quoting values with "
                    "special characters (https://hydra.cc/docs/advanced/override_grammar/basic)")
    return None


def _uncreatable(path: str) -> str | None:
    """Why directory ``path`` could not be created by this user (None: it can, or it exists)."""
    p = Path(path).expanduser()   # as written, so the message names what the user wrote
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    if not os.access(p, os.W_OK) or Path("/proc") in (p.absolute(), *p.absolute().parents):
        return f"{p} does not allow creating directories"
    return None


def hydra_error_line(text: str) -> str:
    """Hydra's multi-line report of a bad command line as one line: the message, the allowed
    options when it lists them, without the search path and the HYDRA_FULL_ERROR hint."""
    argparse_error = [line.split(": error: ", 1)[1] for line in text.splitlines() if ": error: " in line]
    if argparse_error:
        return argparse_error[-1]
    parts, options = [], []
    lines = iter(text.splitlines())
    for line in lines:
        s = line.strip()
        if not s or s.startswith(("Set the environment variable HYDRA_FULL_ERROR", "full_key:", "object_type=",
                                  "reference_type=", "Traceback")):
            continue
        if s.startswith("Config search path"):
            break
        if s.startswith("Available options"):
            label = s.rstrip(":")
            options = [o.strip() for o in lines if o.startswith(("\t", "    ")) and o.strip()
                       and not o.strip().startswith("provider=")]
            parts.append(f"{label.lower()}: {', '.join(o for o in options if not o.startswith('Config search'))}")
            break
        if s.rstrip(".") not in parts:
            parts.append(s.rstrip("."))
    return "; ".join(parts) if parts else "the command line was not understood (see --help)"
