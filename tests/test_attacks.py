"""The attacks: always inside the ε-ball, and each one does what it is named for.

The learned-adversary test trains a victim and an adversary for real (slow-marked, ~3 minutes):
``python -m pytest -m slow tests/test_attacks.py``.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunerl import attacks as A
from prunerl.adversary import make_adversary_env
from prunerl.envs import make_env, normalizer_of
from prunerl.evaluation import collect_transitions
from prunerl.models import Critic, GaussianActor
from prunerl.sa import gaussian_kl

OBS, ACT = 11, 3


def _nets(seed: int):
    """A victim (actor, critic), a Q and an adversary that are non-trivial functions of the input."""
    torch.manual_seed(seed)
    actor, critic = GaussianActor(OBS, ACT, (32, 32), "tanh", 0.1), Critic(OBS, (32, 32), "tanh")
    q, adversary = A.QNetwork(OBS, ACT, (16, 16)), GaussianActor(OBS, OBS, (16, 16), "tanh", 0.1)
    for net in (actor, critic, q, adversary):
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return actor, critic, q, adversary


def _attack(name, actor, critic, q, adversary, eps, steps, random_start, gen):
    grad = dict(steps=steps, step_size=eps / 10, random_start=random_start, generator=gen)
    return {
        "random": lambda: A.random_attack(eps, gen),
        "critic": lambda: A.critic_attack(critic, eps, **grad),
        "mad": lambda: A.mad_attack(actor, actor.std, eps, **grad),
        "rs": lambda: A.rs_attack(q, actor, eps, **grad),
        "optimal": lambda: A.optimal_attack(adversary, eps, lambda s: 3 * s),
    }[name]()


def test_every_attack_name_is_built():
    assert set(A.ATTACKS) == {"random", "critic", "mad", "rs", "optimal"}


@pytest.mark.parametrize("name", A.ATTACKS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.5),
       steps=st.integers(0, 12), random_start=st.booleans(), scale=st.floats(0.1, 10.0))
def test_every_attack_stays_in_the_ball(name, seed, eps, steps, random_start, scale):
    """Each attack's *own* output (before the ``in_ball`` clamp, which is only a second guard) is
    inside B(s): ‖ŝ − s‖∞ ≤ ε up to float rounding; and so is the clamped one."""
    actor, critic, q, adversary = _nets(seed % 7)
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(128, OBS, generator=gen) * scale
    perturb = _attack(name, actor, critic, q, adversary, eps, steps, random_start, gen)
    tol = 1e-6 * (1 + obs.abs())
    with torch.no_grad():  # as run_episodes calls it
        own = perturb.unclamped(obs)
        s_hat = perturb(obs)
    for out in (own, s_hat):
        assert out.shape == obs.shape and torch.isfinite(out).all()
        assert ((out - obs).abs() <= eps + tol).all(), (name, float((out - obs).abs().max()), eps)
    assert not any(p.grad is not None for net in (actor, critic, q) for p in net.parameters())


def test_gradient_attacks_use_the_ball():
    """Not vacuous: with a budget, gradient attacks move to the ball's surface (sign steps)."""
    actor, critic, q, adversary = _nets(0)
    obs = torch.randn(256, OBS)
    for name in ("critic", "mad", "rs"):
        s_hat = _attack(name, actor, critic, q, adversary, 0.1, 10, True, torch.Generator().manual_seed(0))(obs)
        assert (s_hat - obs).abs().amax(-1).mean() > 0.09, name


def test_mad_reaches_a_larger_kl_than_random():
    actor, *_ = _nets(1)
    obs = torch.randn(512, OBS)
    eps = 0.05
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mean = actor(obs)
        kl_random = gaussian_kl(mean, actor(A.random_attack(eps, gen)(obs)), actor.std)
        kl_mad = gaussian_kl(mean, actor(A.mad_attack(actor, actor.std, eps, generator=gen)(obs)), actor.std)
    assert kl_mad.mean() > 2 * kl_random.mean()
    assert (kl_mad >= kl_random).float().mean() > 0.9


def test_critic_attack_lowers_the_value():
    _, critic, *_ = _nets(2)
    obs = torch.randn(512, OBS)
    s_hat = A.critic_attack(critic, 0.05, generator=torch.Generator().manual_seed(0))(obs)
    with torch.no_grad():
        v, v_hat = critic(obs), critic(s_hat)
    random_hat = A.random_attack(0.05, torch.Generator().manual_seed(0))(obs)
    with torch.no_grad():
        v_random = critic(random_hat)
    assert v_hat.mean() < v.mean() and v_hat.mean() < v_random.mean()
    assert (v_hat < v).float().mean() > 0.95


def test_rs_attack_lowers_q_of_the_victims_action():
    actor, _, q, _ = _nets(3)
    obs = torch.randn(512, OBS)
    s_hat = A.rs_attack(q, actor, 0.05, generator=torch.Generator().manual_seed(0))(obs)
    with torch.no_grad():
        assert q(obs, actor(s_hat)).mean() < q(obs, actor(obs)).mean()


def test_robust_sarsa_training_lowers_its_td_loss():
    """On real clean transitions of a victim on InvertedPendulum (its own normaliser, frozen)."""
    torch.manual_seed(0)
    env = make_env("inverted_pendulum", 4, seed=0)
    norm_state = normalizer_of(env).state_dict()
    env.close()
    actor = GaussianActor(4, 1, (32, 32), "tanh", 0.1)
    data = collect_transitions(actor, norm_state, "inverted_pendulum", 512, seed=0, num_envs=8)
    assert data["observation"].shape == (512, 4) and data["action"].shape == (512, 1)
    assert data["terminated"].any()  # episodes end inside the data: the TD target must cut there
    q = A.QNetwork(4, 1)
    # γ = 0.9: a short horizon, so that bootstrapping from Q = 0 settles within a test's budget
    # (with γ = 0.99 the TD loss first rises for a few dozen epochs while the values grow)
    history = A.train_robust_sarsa(q, data, gamma=0.9, epochs=16, minibatches=16, lr=1e-2, reg=0.1,
                                   generator=torch.Generator().manual_seed(0))
    assert len(history) == 17
    assert history[-1] < 0.5 * history[0]
    # the robustness penalty is active: Q barely moves inside the action ball it was trained on
    batch = {k: v[:256] for k, v in data.items()}
    assert float(A.robustness_penalty(q, batch, 0.02).detach()) < 0.1 * history[0]


def test_sarsa_target_bootstraps_with_the_next_action_taken():
    """TD target r + γ(1−term)·Q(s′, a′) with a′ the action taken at s′ (``next_action``), not μ(s′)."""
    torch.manual_seed(0)
    actor, _, q, _ = _nets(4)
    n = 64
    batch = {"observation": torch.randn(n, OBS), "action": torch.randn(n, ACT), "reward": torch.randn(n),
             "next_observation": torch.randn(n, OBS), "next_action": torch.randn(n, ACT),
             "terminated": torch.arange(n) % 5 == 0}
    gamma = 0.9
    with torch.no_grad():
        q_sa = q(batch["observation"], batch["action"])
        boot = gamma * (~batch["terminated"]).float()

        def loss_with(a_next):
            return (q_sa - (batch["reward"] + boot * q(batch["next_observation"], a_next))).pow(2).mean()

        expected, with_mu = loss_with(batch["next_action"]), loss_with(actor(batch["next_observation"]))
        assert float(A.td_loss(q, batch, gamma)) == pytest.approx(float(expected), rel=1e-5)
        assert abs(float(with_mu) - float(expected)) > 0.05 * float(expected)  # the test can tell them apart
        # terminal transitions do not bootstrap: their a′ does not matter
        moved = dict(batch, next_action=torch.where(batch["terminated"].unsqueeze(-1), 100.0, batch["next_action"]))
        assert float(A.td_loss(q, moved, gamma)) == pytest.approx(float(expected), rel=1e-5)


def test_collected_next_action_is_the_action_taken_next_in_the_same_episode():
    """Rows are step-major (row t·n + i: env i at step t). Within an episode, (s′, a′) of step t are
    (s, a) of step t+1; where the episode ended at s′ the env was reset, so step t+1's action is a
    new episode's and must not be a′ (a′ is then drawn from π at s′)."""
    torch.manual_seed(0)
    n = 8
    env = make_env("inverted_pendulum", 4, seed=0)
    norm_state = normalizer_of(env).state_dict()
    env.close()
    actor = GaussianActor(4, 1, (32, 32), "tanh", sigma=0.5)  # sampled actions: a′ ≠ μ(s′)
    data = collect_transitions(actor, norm_state, "inverted_pendulum", 600, seed=0, num_envs=n)
    assert data["next_action"].shape == data["action"].shape == (600, 1)
    rows = torch.arange(600 - n)
    same_episode = data["next_observation"][rows].eq(data["observation"][rows + n]).all(-1)
    ended = data["terminated"][rows]
    assert same_episode.float().mean() > 0.8 and ended.any()  # both cases occur in the data
    assert torch.equal(same_episode, ~ended)  # (InvertedPendulum ends only by termination here)
    assert torch.equal(data["next_action"][rows][same_episode], data["action"][rows + n][same_episode])
    assert not data["next_action"][rows][ended].eq(data["action"][rows + n][ended]).any()
    # the last step's a′ is the policy's next draw at s′, not μ(s′)
    with torch.no_grad():
        mu_next = actor(data["next_observation"])
    assert not torch.isclose(data["next_action"], mu_next, atol=1e-3).all()


def test_adversary_env_perturbs_the_victim_and_is_paid_the_negated_reward():
    torch.manual_seed(0)
    env = make_env("inverted_pendulum", 2, seed=0)
    norm_state = normalizer_of(env).state_dict()
    env.close()
    victim = GaussianActor(4, 1, (16, 16), "tanh", 0.1)
    seen = []
    forward = victim.forward
    victim.forward = lambda s: (seen.append(s.clone()), forward(s))[1]
    adv_env = make_adversary_env("inverted_pendulum", victim, norm_state, 2, seed=0, eps=0.1, similarity=10.0,
                                 victim_deterministic=True, scale_reward=False)
    td = adv_env.reset()
    s = adv_env.base_env._s.clone()
    td["action"] = torch.tensor([[1.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])  # 3.0 is clipped to 1
    out = adv_env.step(td)["next"]
    assert torch.allclose(seen[-1], s + 0.1 * torch.tensor([[1.0, -1.0, 0.5, 1.0], [0, 0, 0, 0]]))
    # InvertedPendulum pays the victim 1 per step; penalty λ·‖ŝ − s‖² = λ·ε²·Σa² on the clipped action
    assert out["reward"][0, 0].item() == pytest.approx(-1 - 10 * 0.01 * (1 + 1 + 0.25 + 1))
    assert out["reward"][1, 0].item() == pytest.approx(-1.0)
    assert out["victim_return"][:, 0].tolist() == [1.0, 1.0]
    # finished episodes' victim returns are recorded (the adversary's training curve reads them),
    # each the sum of r_victim = −r_adv − λ·ε²·Σa² (= −r_adv − 0.4 with a = 1) over the episode
    td, running, finished = adv_env.reset(), torch.zeros(2), []
    adv_env.base_env.finished_victim_returns.clear()
    for _ in range(300):
        td["action"] = torch.ones(2, 4)
        td, td_next = adv_env.step_and_maybe_reset(td)
        running += -td["next", "reward"][:, 0] - 0.4
        done = td["next", "done"].squeeze(-1)
        finished += running[done].tolist()
        running[done] = 0
        td = td_next
    assert len(finished) > 5
    assert adv_env.base_env.finished_victim_returns == pytest.approx(finished, abs=1e-4)


@pytest.mark.slow
def test_a_briefly_trained_optimal_adversary_beats_random(tmp_path):
    """Victim: vanilla PPO on InvertedPendulum for 28k frames (it balances for ~130 steps and
    sometimes falls, so the adversary's value function sees which states end episodes sooner);
    adversary: PPO for 61k frames against it, ε = 0.3. The learned attack must lower the victim's
    return well below what the random attack leaves (seen: clean 132, random 118, optimal 50)."""
    from omegaconf import OmegaConf

    from prunerl.checkpoint import actor_from_checkpoint, critic_from_checkpoint, load_checkpoint
    from prunerl.evaluate import evaluate_policy
    from prunerl.fit import fit
    from tests.conftest import compose_cfg

    run = tmp_path / "victim"
    fit(compose_cfg(run, "env=inverted_pendulum", "env.num_envs=8", "total_frames=28672",
                    "algo.frames_per_batch=2048", "algo.minibatches=16", "algo.epochs=4", "algo.model.hidden=[64,64]",
                    "algo.kappa=0", "pruning=none", "logger=none", "callbacks.progress=null",
                    "callbacks.evaluation=null"))
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    actor, norm_state, _ = actor_from_checkpoint(ckpt)
    settings = OmegaConf.load("conf/evaluation/default.yaml")
    settings.attacks, settings.episodes, settings.eps = ["random", "optimal"], 16, 0.3
    settings.optimal.frames, settings.optimal.seeds = 61440, [0]
    result = evaluate_policy(actor, critic_from_checkpoint(ckpt), norm_state, "inverted_pendulum", settings,
                             victim_path=ckpt_path, log=print)
    print(result["clean_return"], result["attack_returns"])
    assert result["attack_returns"]["optimal"] < 0.8 * result["attack_returns"]["random"]
    assert result["attacks"]["optimal"]["mean_perturbation_linf"] <= 0.3 + 1e-6
    assert list(run.joinpath("checkpoints").glob("last.adversary-*/checkpoints/last.ckpt"))


def test_a_robust_sarsa_q_depends_on_its_seed_alone(tmp_path):
    """The same victim and seed give the same Q whatever used torch's RNG before (a fit's callback
    and the evaluate command reported different `rs` for one checkpoint) and whichever other scan
    pairs were trained beside it (or found in the cache)."""
    from omegaconf import OmegaConf

    from prunerl.trained_attacks import robust_sarsa_qs

    env = make_env("inverted_pendulum", 4, seed=0)
    norm_state = normalizer_of(env).state_dict()
    env.close()
    torch.manual_seed(0)
    actor = GaussianActor(4, 1, (32, 32), "tanh", sigma=0.5)
    settings = OmegaConf.load("conf/evaluation/default.yaml")
    settings.rs.frames, settings.rs.epochs, settings.rs.minibatches = 512, 2, 4
    settings.rs.scan = [[0.05, 10.0], [0.2, 10.0]]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.manual_seed(1)
    both = robust_sarsa_qs(tmp_path / "a" / "last.ckpt", actor, norm_state, "inverted_pendulum", settings, log=print)
    settings.rs.scan = [[0.2, 10.0]]
    torch.manual_seed(2)
    torch.rand(100)
    (alone,) = robust_sarsa_qs(tmp_path / "b" / "last.ckpt", actor, norm_state, "inverted_pendulum", settings,
                               log=print)
    assert alone[:2] == both[1][:2] == (0.2, 10.0)
    for p, r in zip(alone[2].parameters(), both[1][2].parameters()):
        assert torch.equal(p, r)
    assert not torch.equal(next(both[0][2].parameters()), next(both[1][2].parameters()))  # pairs differ
