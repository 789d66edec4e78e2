"""The batched MuJoCo env, the normaliser, and exact env-state round trips."""

import numpy as np
import pytest
import torch

from prunerl.envs import MujocoVecEnv, RunningNormalizer, make_env, normalizer_of
from prunerl.evaluation import run_episodes
from prunerl.models import GaussianActor


def _random_steps(env, n, seed):
    g = torch.Generator().manual_seed(seed)
    td = env.reset() if not hasattr(env, "_td") else env._td
    out = []
    for _ in range(n):
        td["action"] = torch.rand(env.action_spec.shape, generator=g) * 2 - 1
        td, td_next = env.step_and_maybe_reset(td)
        out.append(td["next"].clone())
        td = td_next
    env._td = td
    return torch.stack(out)


def test_frames_and_episode_tracking_are_exact():
    env = make_env("hopper", 4, seed=0)
    data = _random_steps(env, 300, seed=1)
    assert data.shape == (300, 4)  # 1,200 frames, counted exactly
    done = data["done"].squeeze(-1)
    assert done.any()
    lengths = data["episode_length"].squeeze(-1)[done]
    # episode lengths of finished episodes add up with the unfinished remainder to the frames
    ongoing = data["episode_length"][-1].squeeze(-1)
    ongoing = torch.where(done[-1], torch.zeros_like(ongoing), ongoing)
    assert int(lengths.sum() + ongoing.sum()) == 1200


def test_normaliser_moves_in_training_and_not_when_frozen():
    env = make_env("hopper", 4, seed=0)
    norm = normalizer_of(env)
    _random_steps(env, 50, seed=0)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    assert norm.obs_count > 100
    norm.freeze()
    data = _random_steps(env, 50, seed=1)
    after = norm.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert data["observation"].abs().max() <= norm.clip


def test_evaluation_rollouts_do_not_move_the_checkpoint_statistics():
    """The env ``run_episodes`` rolls out in normalises every observation with the checkpoint's
    statistics, unchanged from the first step to the last: what the policy saw (recorded through the
    attack interface) equals the raw observations of the same trajectory normalised with the
    loaded statistics."""
    env = make_env("hopper", 4, seed=0)
    _random_steps(env, 100, seed=0)
    state = {k: v.clone() for k, v in normalizer_of(env).state_dict().items()}
    saved = {k: v.clone() for k, v in state.items()}
    torch.manual_seed(0)
    actor = GaussianActor(11, 3, (16, 16), "tanh")
    seen = []
    res = run_episodes(actor, state, "hopper", episodes=2, num_envs=2, deterministic=True, seed=0,
                       perturb=lambda obs: seen.append(obs.clone()) or obs)
    assert res["episodes"] == 2 and len(seen) > 30
    for k in saved:  # the caller's statistics are not touched either
        assert torch.equal(state[k], saved[k]), k
    # replay the same trajectory in a plain (unnormalised) env: same seeds, the policy's actions
    raw_env = MujocoVecEnv("Hopper-v5", 2, seed=0)
    raw_env.set_seed(0)
    td = raw_env.reset()
    loaded = RunningNormalizer(11, 2).load_statistics(saved)
    for t, obs_seen in enumerate(seen[:30]):
        assert torch.equal(obs_seen, loaded.normalize(td["observation"])), t
        with torch.no_grad():
            td["action"] = actor(obs_seen)
        td = raw_env.step(td)["next"]
        if td["done"].any():
            break
    assert t >= 10  # the comparison covered steps after the first update a live normaliser would make


def test_env_state_round_trip_continues_bit_for_bit():
    a = make_env("hopper", 3, seed=5)
    _random_steps(a, 40, seed=0)
    saved_env = a.base_env.state()
    saved_norm = {k: v.clone() for k, v in normalizer_of(a).state_dict().items()}
    saved_td = a._td.clone()
    cont_a = _random_steps(a, 60, seed=9)

    b = make_env("hopper", 3, seed=123)  # another seed: everything must come from the state
    normalizer_of(b).load_state_dict(saved_norm)
    b.base_env.load_state(saved_env)
    td = b.reset()  # the first full reset after load continues the saved episodes
    assert torch.equal(td["observation"], saved_td["observation"])
    b._td = td
    cont_b = _random_steps(b, 60, seed=9)
    assert torch.equal(cont_a["observation"], cont_b["observation"])
    assert torch.equal(cont_a["reward"], cont_b["reward"])
    assert torch.equal(cont_a["done"], cont_b["done"])


def test_actions_are_clipped_to_the_action_bounds():
    env = MujocoVecEnv("Hopper-v5", 1, seed=0)
    td = env.reset()
    td["action"] = torch.full((1, 3), 50.0)
    r_big = env.step(td)["next", "reward"].item()
    env2 = MujocoVecEnv("Hopper-v5", 1, seed=0)
    td2 = env2.reset()
    td2["action"] = torch.ones(1, 3)
    r_one = env2.step(td2)["next", "reward"].item()
    assert r_big == pytest.approx(r_one)


def test_unknown_env_id_is_rejected():
    with pytest.raises(ValueError, match="Hopper-v4"):
        MujocoVecEnv("Hopper-v4", 1)
    with pytest.raises(ValueError, match="allowed"):
        make_env("pong", 1, 0)


def test_running_statistics_match_numpy():
    norm = RunningNormalizer(3, 2, scale_reward=False)
    xs = np.random.default_rng(0).normal(2.0, 3.0, size=(500, 3))
    for chunk in np.split(xs, 50):
        norm._update(norm.obs_mean, norm.obs_var, norm.obs_count, torch.as_tensor(chunk))
    assert np.allclose(norm.obs_mean.numpy(), xs.mean(0), atol=1e-3)
    assert np.allclose(norm.obs_var.numpy(), xs.var(0), rtol=1e-3)


@pytest.mark.parametrize("threads", [1, 2])
def test_envs_share_one_model_and_step_like_independent_gymnasium_envs(threads):
    """The gymnasium engine steps all its envs with one MjModel, serially or in threads; each env's
    trajectory is bit-identical to a standalone Gymnasium env's with the same seed and actions."""
    import gymnasium as gym

    n, steps = 3, 60
    env = MujocoVecEnv("Walker2d-v5", n, seed=7, threads=threads, engine="gymnasium")
    assert len(env.engine._chunks) == threads
    assert len({id(e.unwrapped.model) for e in env.engine.envs}) == 1
    refs = [gym.make("Walker2d-v5", disable_env_checker=True) for _ in range(n)]
    ref_obs = np.stack([r.reset(seed=7 + i)[0] for i, r in enumerate(refs)])
    td = env.reset()
    assert np.array_equal(td["observation"].numpy(), ref_obs.astype(np.float32))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        act = rng.uniform(-1, 1, size=(n, 6)).astype(np.float32)
        td["action"] = torch.from_numpy(act)
        out = env.step(td)["next"]
        for i, r in enumerate(refs):
            o, rew, term, trunc, _ = r.step(act[i].astype(np.float64))
            assert np.array_equal(out["observation"][i].numpy(), o.astype(np.float32))
            assert out["reward"][i].item() == np.float32(rew)
            assert bool(out["terminated"][i]) == term
            if term or trunc:
                return  # episode over: the comparison above covered it
        td = out.clone()


@pytest.mark.parametrize("engine", ["gymnasium", "mujoco"])
def test_threaded_stepping_is_bit_identical_over_resets(engine):
    """threads=2 gives exactly threads=1's observations, rewards and done flags over 400 steps of
    16 Hopper envs with resets, on either engine; a bad thread count is refused."""
    def run(threads):
        env = make_env("hopper", 16, seed=3, threads=threads, engine=engine)
        rng = np.random.default_rng(1)
        td, rows = env.reset(), []
        for _ in range(400):
            td["action"] = torch.from_numpy(rng.uniform(-1, 1, size=(16, 3)).astype(np.float32))
            td, nxt = env.step_and_maybe_reset(td)
            rows.append(torch.cat([td["next", "observation"], td["next", "reward"], td["next", "done"].float()], -1))
            td = nxt
        env.close()
        return torch.stack(rows)

    serial, threaded = run(1), run(2)
    assert serial[..., -1].sum() > 0  # some episodes ended and were reset
    assert torch.equal(serial, threaded)
    with pytest.raises(ValueError, match="env.threads=0"):
        MujocoVecEnv("Hopper-v5", 2, threads=0)
