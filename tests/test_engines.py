"""The physics engines (``env.engine``): the ``mujoco`` engine — the v5 task definitions over MuJoCo's
C batch API — is bit-identical to the ``gymnasium`` engine (Gymnasium's own envs, the reference)
for every task, over resets, threads and checkpoints."""

import numpy as np
import pytest
import torch

from prunerl.envs import ENGINES, TASKS, MujocoVecEnv, make_engine, make_env, normalizer_of
from prunerl.envs.tasks import DEFINITIONS, Fields


def _episodes(engine: str, env_id: str, num_envs: int, steps: int, *, seed: int, threads: int = 1):
    """Random actions on ``engine`` with MujocoVecEnv's reset rules (env i first seeded seed + i,
    then continuing its RNG; done envs reset after the step). Returns float64 observations (the
    step's, then the reset ones where envs reset), rewards, terminated and truncated flags."""
    e = make_engine(engine, env_id, num_envs, threads)
    rng = np.random.default_rng(seed)
    obs = [e.reset(np.arange(num_envs), [seed + i for i in range(num_envs)])]
    rewards, terminated, truncated = [], [], []
    for _ in range(steps):
        o, r, term, trunc = e.step(rng.uniform(e.action_low, e.action_high, size=(num_envs, len(e.action_low))))
        obs.append(o.copy())
        rewards.append(np.asarray(r, dtype=np.float64))
        terminated.append(term.copy())
        truncated.append(trunc.copy())
        done = np.flatnonzero(term | trunc)
        if len(done):
            fresh = o.copy()
            fresh[done] = e.reset(done, [None] * len(done))
            obs.append(fresh)
    e.close()
    return [np.stack(x) for x in (obs, rewards, terminated, truncated)]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_mujoco_engine_is_bit_identical_to_gymnasium(task):
    """Same seeds and actions → the same float64 observations (reset ones included), rewards,
    terminations and truncations, exactly, over 1,050 steps of 3 envs with resets — the mujoco
    engine on 2 threads, Gymnasium's envs one by one."""
    env_id = TASKS[task].env_id
    ref = _episodes("gymnasium", env_id, 3, 1050, seed=11)
    new = _episodes("mujoco", env_id, 3, 1050, seed=11, threads=2)
    for name, a, b in zip(("observation", "reward", "terminated", "truncated"), ref, new):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(a, b), f"{task}: {name} differs first at step {np.argwhere(a != b)[0]}"
    terminated, truncated = ref[2], ref[3]
    assert (terminated | truncated).sum() >= 3  # resets (and what followed them) were compared
    if task == "halfcheetah":  # never terminates: the time limit ends every episode
        assert truncated.sum() == 3 and not terminated.any()
    else:
        assert terminated.any()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_states_far_from_the_random_walk_match_gymnasium(task):
    """Observations, rewards and termination on states random actions rarely reach: every health
    bound crossed (too high, too low, tilted, |qvel| past the observation clip and Hopper's state
    range), bodies interpenetrating. 64 random states, from near the initial one to far from it
    (position noise 0.01–2, velocity noise 0.1–150), and, in the first envs, the initial state with
    one velocity at 95 (inside Hopper's state range, not inside 90), are set in Gymnasium's envs,
    carried to the mujoco engine through the env state, and both take 5 steps."""
    env_id, n = TASKS[task].env_id, 64
    ref, new = make_engine("gymnasium", env_id, n), make_engine("mujoco", env_id, n)
    ref.reset(np.arange(n), list(range(n)))
    rng = np.random.default_rng(5)
    for env, pos, vel in zip(ref.envs, np.geomspace(0.01, 2, n), rng.permutation(np.geomspace(0.1, 150, n))):
        u = env.unwrapped
        u.set_state(u.init_qpos + rng.uniform(-pos, pos, u.model.nq), rng.normal(0, vel, u.model.nv))
    for k, env in enumerate(ref.envs[:ref.envs[0].unwrapped.model.nv]):
        env.unwrapped.set_state(env.unwrapped.init_qpos, 95.0 * np.eye(env.unwrapped.model.nv)[k])
    new.load_state(ref.state())
    healthy_any = False
    for _ in range(5):
        action = rng.uniform(ref.action_low, ref.action_high, size=(n, len(ref.action_low)))
        a, b = ref.step(action), new.step(action)
        for name, x, y in zip(("observation", "reward", "terminated", "truncated"), a, b):
            assert np.array_equal(x, y), f"{task}: {name}"
        healthy_any |= bool((~a[2]).any())
    if task != "halfcheetah":
        assert a[2].any() and healthy_any  # both sides of the bounds were seen
    ref.close()
    new.close()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_time_limit_truncates_alike_on_every_task(task):
    """Truncation on every task (random walks reach the 1,000-step limit only on HalfCheetah and
    Ant): 4 envs 999, 998, 997, 996 steps into their episodes — step counts set in Gymnasium's
    TimeLimit and carried to the mujoco engine through the env state — take 6 steps with resets
    of done envs; flags, rewards and observations (reset ones included) are the same."""
    env_id, n = TASKS[task].env_id, 4
    ref, new = make_engine("gymnasium", env_id, n), make_engine("mujoco", env_id, n)
    ref.reset(np.arange(n), [3 + i for i in range(n)])
    for k, env in enumerate(ref.envs):
        assert hasattr(env, "_elapsed_steps")  # the outer wrapper is Gymnasium's TimeLimit
        env._elapsed_steps = 999 - k
    new.load_state(ref.state())
    rng = np.random.default_rng(0)
    truncated = np.zeros(n, dtype=bool)
    for _ in range(6):
        action = rng.uniform(ref.action_low, ref.action_high, size=(n, len(ref.action_low)))
        a, b = ref.step(action), new.step(action)
        for name, x, y in zip(("observation", "reward", "terminated", "truncated"), a, b):
            assert np.array_equal(x, y), f"{task}: {name}"
        truncated |= a[3]
        done = np.flatnonzero(a[2] | a[3])
        if len(done):
            assert np.array_equal(ref.reset(done, [None] * len(done)), new.reset(done, [None] * len(done))), task
    assert truncated.any(), task
    ref.close()
    new.close()


def _rollout(env, steps, seed):
    g = torch.Generator().manual_seed(seed)
    td = env._td if hasattr(env, "_td") else env.reset()
    out = []
    for _ in range(steps):
        td["action"] = torch.rand(env.action_spec.shape, generator=g) * 3 - 1.5  # some outside the bounds
        td, nxt = env.step_and_maybe_reset(td)
        out.append(td["next"].clone())
        td = nxt
    env._td = td
    return torch.stack(out)


def test_torchrl_env_and_normaliser_are_identical_on_both_engines():
    """What the collector sees — normalised observations, scaled rewards, episode totals, flags —
    and the normaliser's statistics, for Walker2d over 300 steps of 4 envs with resets."""
    a = make_env("walker2d", 4, seed=2, engine="gymnasium")
    b = make_env("walker2d", 4, seed=2, engine="mujoco")
    ra, rb = _rollout(a, 300, 0), _rollout(b, 300, 0)
    assert ra["done"].sum() > 4
    for key in ("observation", "reward", "episode_return", "episode_length", "done", "terminated", "truncated"):
        assert torch.equal(ra[key], rb[key]), key
    for key, value in normalizer_of(a).state_dict().items():
        assert torch.equal(value, normalizer_of(b).state_dict()[key]), key


@pytest.mark.parametrize(("first", "then", "task"), [("mujoco", "mujoco", "ant"), ("gymnasium", "mujoco", "hopper"),
                                                     ("mujoco", "gymnasium", "hopper")])
def test_env_state_resumes_bit_for_bit_across_engines(first, then, task):
    """A checkpoint's env state (physics, RNG, step counts; Ant: the torso position the next forward
    reward starts from) continues the episodes exactly, on the same engine or the other one."""
    whole = make_env(task, 3, seed=4, engine=first)
    _rollout(whole, 40, 0)
    saved_env, saved_td = whole.base_env.state(), whole._td.clone()
    saved_norm = {k: v.clone() for k, v in normalizer_of(whole).state_dict().items()}
    cont = _rollout(whole, 80, 1)

    resumed = make_env(task, 3, seed=99, engine=then)  # another seed: everything comes from the state
    normalizer_of(resumed).load_state_dict(saved_norm)
    resumed.base_env.load_state(saved_env)
    td = resumed.reset()
    assert torch.equal(td["observation"], saved_td["observation"])
    resumed._td = td
    again = _rollout(resumed, 80, 1)
    assert cont["done"].any() or task == "ant"
    for key in ("observation", "reward", "done", "episode_return"):
        assert torch.equal(cont[key], again[key]), key


def test_task_definitions_run_on_torch_tensors():
    """The definitions use only what NumPy and torch share, so a GPU engine holding its state in
    torch tensors (MuJoCo Warp) can reuse them: float64 tensors give NumPy's figures."""
    for env_id, task in DEFINITIONS.items():
        e = make_engine("mujoco", env_id, 3)
        e.reset(np.arange(3), [0, 1, 2])
        rng = np.random.default_rng(0)
        for _ in range(20):
            before = e._position.copy()
            action = rng.uniform(e.action_low, e.action_high, size=(3, len(e.action_low)))
            e.step(action)
        f = e.fields()
        ft = Fields(*(None if x is None else torch.from_numpy(np.array(x)) for x in f))
        obs, obs_t = task.observation(f), task.observation(ft)
        (r, term), (r_t, term_t) = (task.reward_and_termination(g, b, a, e.dt) for g, b, a in
                                    ((f, before, action), (ft, torch.from_numpy(before), torch.from_numpy(action))))
        assert isinstance(obs_t, torch.Tensor) and obs_t.dtype == torch.float64, env_id
        assert np.allclose(obs_t.numpy(), obs, rtol=0, atol=1e-12), env_id
        assert np.allclose(r_t.numpy(), r, rtol=0, atol=1e-9), env_id
        assert np.array_equal(term_t.numpy(), term), env_id
        e.close()


def test_unknown_engine_is_refused():
    assert ENGINES == ("gymnasium", "mujoco")
    with pytest.raises(ValueError, match="env.engine='bullet'.*allowed"):
        MujocoVecEnv("Hopper-v5", 2, engine="bullet")


def test_fit_resumes_and_evaluates_on_either_engine(tmp_path, monkeypatch):
    """A real fit on ``env.engine=mujoco`` (Hopper: falls, resets, contacts), cut after its first
    rollout and resumed — on the mujoco engine, and on the gymnasium one from the same checkpoint —
    ends exactly like the uncut run, its end-of-fit evaluation included. ``evaluate`` on a
    checkpoint (clean, random, mad, Robust Sarsa) runs on the run's own engine, and the two
    engines' figures are the same."""
    from prunerl.envs import vec_env
    from prunerl.evaluate import evaluate
    from prunerl.fit import fit
    from tests.conftest import SMALL, compose_cfg

    used = []
    real = vec_env.make_engine

    def spy(engine, *args, **kwargs):
        used.append(engine)
        return real(engine, *args, **kwargs)

    monkeypatch.setattr(vec_env, "make_engine", spy)
    small = [o for o in SMALL if not o.startswith("env=")]
    run = ("env=hopper", *small, "total_frames=3072", "checkpoint.every_n_rollouts=1",
           "evaluation.episodes=2", "evaluation.attacks=[random]")
    full = fit(compose_cfg(tmp_path / "full", *run, "env.engine=mujoco"))
    assert set(used) == {"mujoco"}
    cut = sorted((tmp_path / "full" / "checkpoints").glob("rollout*.ckpt"))[0]
    last = {}
    for engine in ("mujoco", "gymnasium"):
        used.clear()
        # another seed: every RNG stream and the envs' state must come from the checkpoint
        resumed = fit(compose_cfg(tmp_path / engine, *run, f"env.engine={engine}", f"resume={cut}", "seed=7"))
        assert set(used) == {engine}
        a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
        b = torch.load(tmp_path / engine / "checkpoints" / "last.ckpt", weights_only=False)
        assert a["global_step"] == b["global_step"] == 48
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), (engine, k)
        for k, v in a["RolloutDataModule"]["normalizer"].items():
            assert torch.equal(v, b["RolloutDataModule"]["normalizer"][k]), (engine, k)
        assert a["RolloutDataModule"]["recent_returns"] == b["RolloutDataModule"]["recent_returns"]
        assert resumed["evaluation"] == full["evaluation"], engine
        last[engine] = tmp_path / engine / "checkpoints" / "last.ckpt"

    results = {}
    for engine, ckpt in last.items():
        used.clear()
        torch.manual_seed(0)  # Robust Sarsa's Q is initialised from the global torch RNG
        results[engine] = evaluate(compose_cfg(
            None, f"checkpoint={ckpt}", "attacks=[random,mad,rs]", "episodes=3", "stochastic=false",
            "rs.frames=512", "rs.epochs=1", "rs.minibatches=4", "rs.scan=[[0.1,1.0]]", config_name="evaluate"))
        assert set(used) == {engine}
    a, b = results["mujoco"], results["gymnasium"]
    assert a["clean"]["returns"] == b["clean"]["returns"] and a["clean"]["episodes"] == 3
    assert a["attack_returns"] == b["attack_returns"] and set(a["attack_returns"]) == {"random", "mad", "rs"}


def test_the_c_batch_binding_keeps_its_memory_and_refuses_misuse():
    """The mujoco engine's ctypes binding: the batch runs on the threads asked for (read back from
    MuJoCo); a NumPy view of its C memory keeps that memory alive after the engine is gone (no
    use-after-free); a closed batch refuses calls; ids MuJoCo would not check, and an action of the
    wrong shape (which NumPy would broadcast to every env), are refused — MuJoCo's own error for bad
    ids ends the process."""
    import gc
    import weakref

    e = make_engine("mujoco", "Ant-v5", 3, threads=2)
    assert e.batch.nthread == 2 and make_engine("mujoco", "Ant-v5", 3, threads=5).batch.nthread == 3
    e.reset(np.arange(3), [0, 1, 2])
    qpos, forces = e.qpos, e.derived["cfrc_ext"]
    expected = qpos.copy(), forces.copy()
    memory = weakref.ref(e.batch._memory)
    batch = e.batch
    e.close()
    with pytest.raises(RuntimeError, match="closed"):
        batch.step(1)
    del e, batch
    gc.collect()
    assert memory() is not None  # the views hold it...
    assert np.array_equal(qpos, expected[0]) and np.array_equal(forces, expected[1])
    del qpos, forces
    gc.collect()
    assert memory() is None  # ...and it goes with the last one

    e = make_engine("mujoco", "Hopper-v5", 2)
    for bad in ([0, 2], [1, 0], [1, 1], [-1]):
        with pytest.raises(IndexError, match=r"not sorted, unique and in \[0, 2\)"):
            e.batch.reset(np.array(bad))
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        e.step(np.zeros(3))
    e.close()
