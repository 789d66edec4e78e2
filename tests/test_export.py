"""`python -m prunerl export` (issue 14, item 4): the deterministic policy μ(s), normaliser folded
in, as one ONNX or TorchScript file that computes what the in-process actor and normaliser compute;
a neuron-pruned policy comes out physically smaller; bad input is one line, exit 2, nothing written."""

import json
import sys

# onnx and onnxruntime are imported, not importorskip'ed: the README's test command installs them
# (pyproject's `test` extra), and a CI without them must fail here, not skip the export tests
import onnx
import onnxruntime as ort
import pytest
import torch

from prunerl.checkpoint import actor_from_checkpoint, frozen_normalizer, load_checkpoint
from prunerl.cli import main
from prunerl.config import ConfigError
from prunerl.export import FORMATS, export_policy, live_units
from prunerl.fit import fit
from tests.conftest import SMALL, compose_cfg


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dense") / "run"
    fit(compose_cfg(run, *SMALL, "pruning=none", "algo.kappa=0", "++callbacks.evaluation=null"))
    return run


def _in_process(ckpt_path):
    """μ as training computes it: the checkpoint's actor after its frozen RunningNormalizer."""
    actor, norm_state, cfg = actor_from_checkpoint(load_checkpoint(ckpt_path))
    norm = frozen_normalizer(norm_state, clip=cfg["env"]["clip_obs"])

    def mu(obs):
        with torch.no_grad():
            return actor(norm.normalize(obs))

    return mu, norm


def _states(norm, n=1000):
    """Raw observations: most within a few std of the running mean, some far enough out to clip."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, norm.obs_mean.numel(), generator=g) * 2.0
    z[:50] *= 10.0
    return (norm.obs_mean + (norm.obs_var + norm.eps).sqrt() * z).float()


def _onnx_params(path) -> int:
    model = onnx.load(str(path))
    return sum(int(torch.tensor(list(t.dims)).prod()) for t in model.graph.initializer if t.name[0] in "Wb")


@pytest.mark.parametrize("which", ["dense", "neuron"])
def test_exported_files_compute_the_in_process_policy_within_1e5_on_1000_states(which, dense_run, neuron_run, tmp_path):
    ckpt_path = (dense_run if which == "dense" else neuron_run[0]) / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    mu, norm = _in_process(ckpt_path)
    states = _states(norm)
    assert ((states - norm.obs_mean.float()).abs() > 10 * (norm.obs_var + norm.eps).sqrt().float()).any()  # clips
    expected = mu(states)
    for fmt in FORMATS:
        out = tmp_path / f"policy{FORMATS[fmt]}"
        result = export_policy(ckpt, fmt, out)
        assert result["max_abs_diff"] <= 1e-5  # export_policy's own check of the written file
        assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
        if fmt == "onnx":
            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(["action"], {"observation": states.numpy()})[0])
            one = torch.from_numpy(sess.run(["action"], {"observation": states[:1].numpy()})[0])  # batch 1
            assert torch.allclose(one, expected[:1], atol=1e-5, rtol=0)
            meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["prunerl"])
            assert meta["widths"] == result["metadata"]["widths"] and meta["env_id"] == "InvertedPendulum-v5"
        else:
            got = torch.jit.load(str(out))(states).detach()
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5, fmt
    assert result["metadata"]["widths_checkpoint"] == [4, 64, 64, 1]


def test_a_neuron_pruned_policy_is_exported_physically_smaller(dense_run, neuron_run, tmp_path):
    dense = export_policy(load_checkpoint(dense_run / "checkpoints" / "last.ckpt"), "onnx", tmp_path / "dense.onnx")
    pruned = export_policy(load_checkpoint(neuron_run[0] / "checkpoints" / "last.ckpt"), "onnx", tmp_path / "neuron.onnx")
    assert dense["metadata"]["widths"] == [4, 64, 64, 1]  # nothing to drop
    w = pruned["metadata"]["widths"]
    assert w[0] == 4 and w[-1] == 1 and w[1] == w[2] == 34  # 30 of 64 units removed in each layer
    assert pruned["parameters"] == 4 * 34 + 34 + 34 * 34 + 34 + 34 + 1 == _onnx_params(tmp_path / "neuron.onnx")
    assert dense["parameters"] == _onnx_params(tmp_path / "dense.onnx") > 3 * pruned["parameters"]
    assert pruned["bytes"] < dense["bytes"] / 2


def test_only_units_that_cannot_reach_the_output_are_dropped():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.ReLU(),
                              torch.nn.Linear(4, 2))
    with torch.no_grad():
        seq[2].weight[:, 1] = 0                      # unit 1 of layer 0: no outgoing weight
        seq[0].weight[3], seq[0].bias[3] = 0, 0      # unit 3 of layer 0: no input, no bias: tanh(0) = 0
        seq[0].weight[4] = 0                         # unit 4: no input, but a bias: a constant that counts
        seq[4].weight[:, 0] = 0                      # unit 0 of layer 1: no outgoing weight...
        seq[2].weight[2, :] = 0                      # unit 2 of layer 1: its row is zero, its bias is not
        seq[2].weight[[1, 3], 0] = 0                 # unit 0 of layer 0 now only feeds layer-1 unit 0 (dropped)
    keep = live_units(seq)
    assert keep[0].tolist() == [False, False, True, False, True]
    assert keep[1].tolist() == [False, True, True, True]


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["prunerl"])
    code = 0
    try:
        main(["export", *args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_sizes_and_where_it_wrote(monkeypatch, capsys, neuron_run, tmp_path):
    ckpt = neuron_run[0] / "checkpoints" / "last.ckpt"
    code, out, err = _cli(monkeypatch, capsys, f"checkpoint={ckpt}", "format=torchscript", f"out={tmp_path}")
    written = tmp_path / "last.torchscript.pt"
    assert code == 0, err
    assert written.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["last.torchscript.pt"]
    assert "4-64-64-1 -> 4-34-34-1" in out and "parameters  4,545 -> 1,395" in out
    assert f"wrote       {written}" in out and "KiB (torchscript)" in out and "max |torch.jit.load − torch|" in out


def _bad_inputs(tmp_path, ckpt):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:20_000])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        ([f"checkpoint={tmp_path / 'nope.ckpt'}"],
         f"checkpoint={tmp_path / 'nope.ckpt'} does not exist; expected a .ckpt written by `python -m prunerl fit`"),
        ([f"checkpoint={ckpt}", "format=tflite"], "format='tflite' is not allowed; allowed: ['onnx', 'torchscript']"),
        ([f"checkpoint={truncated}"], f"checkpoint={truncated} is not a readable checkpoint ("),
        ([f"checkpoint={ckpt}", f"out={a_file}/policy.onnx"],
         f"out={a_file}/policy.onnx: {a_file} is a file, not a directory; allowed: a path in a writable directory"),
        ([f"checkpoint={ckpt}", f"out={ckpt}"], f"out={ckpt} is the checkpoint itself"),
        ([], "checkpoint=PATH is required"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(monkeypatch, capsys, neuron_run, tmp_path):
    ckpt = neuron_run[0] / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    for args, message in _bad_inputs(tmp_path, ckpt):
        listing = sorted(p.name for p in tmp_path.iterdir())
        ckpt_dir = sorted(p.name for p in ckpt.parent.iterdir())
        code, out, err = _cli(monkeypatch, capsys, *args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: " + message), (args, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written
        assert sorted(p.name for p in ckpt.parent.iterdir()) == ckpt_dir
    assert ckpt.read_bytes() == before


def test_an_unwritable_out_directory_is_refused_before_writing(monkeypatch, neuron_run, tmp_path):
    # (tests run as root here, for whom chmod cannot make a directory unwritable: os.access is faked)
    import prunerl.export as export_mod

    locked = tmp_path / "locked"
    locked.mkdir()
    real = export_mod.os.access
    monkeypatch.setattr(export_mod.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    cfg = compose_cfg(None, f"checkpoint={neuron_run[0] / 'checkpoints' / 'last.ckpt'}", f"out={locked}/sub/p.onnx",
                      config_name="export")
    with pytest.raises(ConfigError, match=f"directory {locked} is not writable; allowed: a path in a writable directory"):
        export_mod.export(cfg)
    assert list(locked.iterdir()) == []
