"""Every bad input fails before training with one clear message; nothing already written is lost."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunerl.config import ConfigError
from prunerl.fit import fit

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prunerl", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.kappa=-0.1"], "algo.kappa=-0.1 is negative"),
        (["env.eps=-0.2"], "env.eps=-0.2 is negative"),
        (["algo.sa.eps=-1"], "algo.sa.eps=-1 is negative"),
        (["algo.frames_per_batch=1020"], "algo.frames_per_batch=1020 is not divisible by env.num_envs=8"),
        (["algo.minibatches=7"], "algo.frames_per_batch=1024 is not divisible by algo.minibatches=7"),
        (["total_frames=0"], "total_frames=0 must be a positive integer"),
        (["env.threads=0"], "env.threads=0 must be a positive integer"),
        (["env.engine=bullet"], "env.engine='bullet' is not allowed; allowed: ['gymnasium', 'mujoco']"),
        (["device=tpu"], "device='tpu' is not allowed; allowed: ['auto', 'cpu', 'cuda']"),
        (["algo.model.activation=gelu"], "algo.model.activation='gelu' is not allowed"),
        (["resume=/no/such/file.ckpt"], "resume=/no/such/file.ckpt does not exist"),
        (["callbacks.lipschitz.certificates=[ibp,lp]"],
         "callbacks.lipschitz.certificates=['ibp', 'lp']: 'lp' is not a certificate method; allowed: ['ibp', 'crown']"),
        (["callbacks.lipschitz.certificate_threshold=2"],
         "callbacks.lipschitz.certificate_threshold=2 is not allowed: a total-variation distance, so a number in (0, 1]"),
    ],
)
def test_bad_config_values_fail_before_anything_is_written(small_cfg, tmp_path, overrides, message):
    cfg = small_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        fit(cfg)
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(small_cfg, tmp_path):
    with pytest.raises(ConfigError, match="device=cuda was asked for, but CUDA is not available"):
        fit(small_cfg("device=cuda"))
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint_for_resume(small_cfg, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        fit(small_cfg(f"resume={bad}"))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ConfigError, match="is not a PruneRL checkpoint"):
        fit(small_cfg(f"resume={other}"))
    # a checkpoint with per-tensor optimiser state (before the flat parameter buffer)
    cfg = small_cfg()
    old = tmp_path / "old.ckpt"
    torch.save({"prunerl": {"config": {"env": {"name": cfg.env.name}}}, "state_dict": {},
                "optimizer_states": [{"state": {}, "param_groups": [{"params": list(range(13))}]}]}, old)
    with pytest.raises(ConfigError, match="optimiser state for 13 parameter tensors"):
        fit(small_cfg(f"resume={old}"))
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten(small_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"precious": true}')
    (run / "config.yaml").write_text("precious: true\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(small_cfg())
    assert (run / "summary.json").read_text() == '{"precious": true}'
    assert (run / "config.yaml").read_text() == "precious: true\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "summary.json"]


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path):
    r = cli("fit", "algo.kappa=-1", f"hydra.run.dir={tmp_path / 'x'}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: algo.kappa=-1 is negative; κ must be >= 0 (0 turns SA off)")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_refused_fit_leaves_no_directory_with_the_default_run_dir(tmp_path, monkeypatch, capsys):
    """Hydra makes outputs/<env>/<time>_s<seed>/ before any check of ours: a refused fit removes it
    and the parents Hydra made for it, but not a parent that was there before."""
    from hydra.core.global_hydra import GlobalHydra

    from prunerl.cli import main

    monkeypatch.chdir(tmp_path)
    for before in ([], ["outputs"]):
        for d in before:
            (tmp_path / d).mkdir()
        GlobalHydra.instance().clear()
        with pytest.raises(SystemExit) as e:
            main(["fit", "algo.kappa=-1"])
        assert e.value.code == 2 and "algo.kappa=-1 is negative" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before


# -- the README's table of bad inputs, each row run as written -----------------------------------
def _readme_rows():
    """(command, arguments, message, whether it runs with the default hydra.run.dir) of each row."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- bad-input-table")[1].split("<!-- /bad-input-table -->")[0]
    rows = []
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3:
            continue
        command, args, message = cells
        code = args.split("`")[1] if args.count("`") >= 2 and not args.startswith("(no") else ""
        rows.append((command, code.split(), message.strip("`"), "default hydra.run.dir" in args))
    return rows


ROWS = _readme_rows()


@pytest.fixture(scope="module")
def bad_input_files(tmp_path_factory):
    """The real files the table's capitalised names stand for, in a folder the rows run in."""
    from tests.conftest import SMALL, compose_cfg

    root = tmp_path_factory.mktemp("bad_inputs")
    runs = root / "A_RUNS_DIR"
    fit(compose_cfg(runs / "run0", *SMALL, "total_frames=1024", "evaluation.attacks=[random]",
                    "evaluation.episodes=2"))
    (root / "PENDULUM.ckpt").write_bytes((runs / "run0" / "checkpoints" / "last.ckpt").read_bytes())
    import shutil

    shutil.copytree(runs / "run0", root / "A_RUN")
    (root / "TRUNCATED.ckpt").write_bytes((root / "PENDULUM.ckpt").read_bytes()[:5000])
    torch.save({"state_dict": {}}, root / "NOT_PRUNERL.ckpt")
    torch.save({"prunerl": {"config": {"env": {"name": "hopper"}}}, "state_dict": {},
                "optimizer_states": [{"state": {}, "param_groups": [{"params": list(range(13))}]}]},
               root / "OLD_FORMAT.ckpt")
    (root / "A_FILE").write_text("not a folder")
    (root / "EMPTY_DIR").mkdir()
    return root


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("command, args, message, default_run_dir", ROWS,
                         ids=[f"{c} {' '.join(a)}" for c, a, _, _ in ROWS])
def test_every_row_of_the_readme_table(bad_input_files, monkeypatch, capsys, command, args, message, default_run_dir):
    from hydra.core.global_hydra import GlobalHydra

    from prunerl.cli import main

    assert len(ROWS) >= 25
    monkeypatch.chdir(bad_input_files)
    before = _tree(bad_input_files)
    argv = [command, *args]
    if command == "fit" and not default_run_dir and not any(a.startswith("hydra.run.dir=") for a in args):
        argv.append("hydra.run.dir=RUN_OUT")
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    # nothing written, not even the run dir (and its parents: outputs/hopper/) Hydra makes before any check of ours
    assert not (bad_input_files / "RUN_OUT").exists() and not (bad_input_files / "outputs").exists()
    assert _tree(bad_input_files) == before
