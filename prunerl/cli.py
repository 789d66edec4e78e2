"""The command line: ``python -m prunerl {fit,evaluate,report,export} [overrides]`` and ``--help``.

Each command is a thin Hydra wrapper around a plain function (``fit(cfg)``, ``evaluate(cfg)``,
``report(...)``, ``export(cfg)``).
Bad input raises :class:`~prunerl.config.ConfigError`; the CLI prints its one-line message and
exits with status 2 before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from prunerl.config import ConfigError

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

            from prunerl.preemption import EXIT_INTERRUPTED
            from prunerl.rundir import format_summary

            summary = fit(cfg)
            if summary.get("busy"):
                print(f"skipped: {summary['run_dir']} is being trained by another fit", flush=True)
                return summary
            if summary.get("status") == "interrupted":
                print(f"interrupted by {summary['interrupted_by']} at {summary['frames']:,} frames; checkpoint: "
                      f"{summary['resume']}\ncontinue with: python -m prunerl fit resume={summary['resume']} "
                      "[the same overrides]", flush=True)
                sys.exit(EXIT_INTERRUPTED)
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
        sys.exit(2)


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
    sys.argv = [f"prunerl {command}", *rest]
    hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(
        lambda cfg: _run(command, cfg))()
