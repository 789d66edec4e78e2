"""The max-KL inner maximisation: max_{ŝ∈B(s)} KL(π(·|s) ‖ π(·|ŝ)) over the ℓ∞ ball of radius ε.

One home for it: the SA regulariser (Sec. 4.2) and the MAD attack both call
:func:`max_kl_perturbation`. For two Gaussians with the same diagonal covariance,
KL(π(·|s) ‖ π(·|ŝ)) = ½ Σ_i ((μ_i(ŝ) − μ_i(s)) / σ_i)², which is what :func:`gaussian_kl` computes.

The maximiser follows the SA-PPO reference (Zhang et al. 2020): start at s + sign(N(0,1))·α,
then ``steps`` projected sign-gradient (SGLD) steps ŝ ← Π_B(ŝ + α·sign(∇ + ξ)), ξ ~ N(0, 2αβ²)
(β = ``noise``). Unlike the reference, the per-state best point seen is returned, so the final KL
is never below the KL at the start.

Speed (it is most of a κ > 0 update): for a plain tanh/ReLU MLP, ∇ = ∂KL/∂ŝ is written out by
hand — one forward, one backward, no autograd graph — and Linear layers of ≥ ``ONEDNN_MIN_WEIGHTS``
weights run on oneDNN with the activation fused (:func:`_max_kl_fast`). The loop it replaced is
kept (:func:`_max_kl_perturbation_reference`, ``input_gradient="reference"``): without oneDNN the
fast loop is bitwise the same, with it the same within float rounding (tests/test_sa.py,
tests/test_fit.py; timings: benchmarks/sa_update.py).

How this differs from the SA-PPO reference (``robust_ppo_step`` / ``get_state_kl_bound_sgld``) —
read κ with these in mind:

- **Scale of the regulariser.** R_SA here is the KL, ½Σ_i((μ_i(ŝ) − μ_i(s))/σ_i)², as the paper
  writes it (Sec. 4.2); the reference regularises Σ_i((μ_i(ŝ) − μ_i(s))/σ_i)² = 2·KL. So PruneRL's
  κ = 0.3 is the reference's ``robust_ppo_reg`` = 0.15 (and the reference's Hopper 0.1 is κ = 0.2 here).
- **SGLD noise.** The reference adds noise of std sqrt(2α·10⁻⁵)/(i+2) at step i to the gradient of
  the batch *mean* of 2·KL, i.e. (2/B)·∇KL per state; here the noise has std sqrt(2α)·β with
  β = 10⁻⁵ on the per-state ∇KL — relative to the gradient 10³–5·10³× smaller at B = 64 (the
  reference's noise decays as 1/(i+2)): our loop is in
  effect projected sign-gradient ascent (tests/test_sa.py checks β = 10⁻⁵ finds the same KL as no
  noise). Measured on a trained Hopper policy (200k frames, learned σ ≈ 0.8–1.1, ε = 0.075,
  8 minibatches of 64): the reference's noisy steps found a mean KL 12% lower than this loop
  (0.0145 vs 0.0162) — ours is the stronger maximiser, so per unit of κ the regulariser here is
  slightly stronger than the reference's on top of the factor 2 above.
- **σ is detached** in the regulariser (the reference's ``ROBUST_PPO_DETACH_STDEV`` option; its
  Hopper config leaves it attached): with a learned σ the regulariser could otherwise lower the KL
  by widening σ instead of flattening μ.

The other variant, ``algo.sa.method=convex`` (SA-PPO's ``robust_ppo_method: convex-relax``; issue 14,
item 2): no inner maximisation, the regulariser is a certified *upper bound* of the max-KL,
:func:`kl_upper_bound` / :func:`sa_regularizer_convex`. Each coordinate of μ(ŝ) is bounded over the
ball, l_j ≤ μ_j(ŝ) ≤ u_j (``prunerl.certify.mixed_output_bounds``: β·CROWN-IBP + (1 − β)·IBP), and

    max_{ŝ∈B∞(s,ε)} KL(π(·|s) ‖ π(·|ŝ)) ≤ ½ Σ_j (max(|u_j − μ_j(s)|, |l_j − μ_j(s)|) / σ_j)²,

μ(s) and σ detached as above; the gradient flows through l and u into every weight of the mean
network. β's schedule (``PPOModule.sa_beta``): from ``beta_start`` to ``beta_end`` over
``beta_ramp`` of the updates, by default 1 → 0 over the first ¾ — CROWN-IBP first, pure IBP at the
end, which is the direction of SA-PPO's code (its IBP weight ramps 0 → 1 over the ε schedule,
``robust_ppo_beta_scheduler_opts: same``) and of CROWN-IBP training (Zhang et al. 2020, ICLR): while
the network is untrained IBP's boxes are loose and its gradient is a poor guide, CROWN-IBP's
tighter bound is the better objective; once training has made the network IBP-friendly the cheap
IBP bound is tight enough. Issue 14's "IBP early" is the other order; ``beta_start=0 beta_end=1``
gives it. The same scale caveat as above: R_SA is the KL, SA-PPO's bound is 2·KL.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn


#: ``algo.sa.method``: ``sgld`` maximises the KL over the ball (:func:`max_kl_perturbation`);
#: ``convex`` minimises a certified upper bound of that maximum (:func:`kl_upper_bound`)
SA_METHODS = ("sgld", "convex")


def gaussian_kl(mean: torch.Tensor, mean_hat: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(μ̂, σ²)) per state (summed over action dimensions)."""
    return 0.5 * ((mean_hat - mean) / std).pow(2).sum(-1)


def _mlp_layers(mean_fn) -> list[nn.Module] | None:
    """The layers of ``mean_fn`` if it is (or is a GaussianActor around) a plain MLP of
    Linear/Tanh/ReLU — the shape whose input gradient :func:`_kl_and_input_grad` writes out."""
    from prunerl.models import GaussianActor

    if type(mean_fn) is GaussianActor:
        mean_fn = mean_fn.mean_net
    if type(mean_fn) is not nn.Sequential or not all(type(m) in (nn.Linear, nn.Tanh, nn.ReLU) for m in mean_fn):
        return None
    return list(mean_fn)


def plain_mlp(mean_fn) -> nn.Sequential | None:
    """The ``nn.Sequential`` of ``mean_fn`` (itself, or a GaussianActor's mean network) if it is a
    plain MLP Linear, act, Linear, …, Linear with tanh/ReLU activations — what the convex relaxation
    (``algo.sa.method=convex``) bounds; else None."""
    from prunerl.models import GaussianActor

    layers = _mlp_layers(mean_fn)
    if (layers is None or len(layers) % 2 == 0 or any(type(m) is not nn.Linear for m in layers[::2])
            or any(type(m) is nn.Linear for m in layers[1::2])):
        return None
    return mean_fn.mean_net if type(mean_fn) is GaussianActor else mean_fn


@torch.no_grad()
def _kl_and_input_grad(layers: list[nn.Module], s_hat: torch.Tensor, mean: torch.Tensor,
                       std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(π(·|s) ‖ π(·|ŝ)) per state and its gradient ∂KL/∂ŝ = J(ŝ)ᵀ(μ(ŝ) − μ(s))/σ², by one forward
    and one hand-written backward pass: no autograd graph, no parameter touched (~1.5× faster
    inner loop at 64×64 on a CPU core, ~1.15× at 256×256, where the matmuls dominate). Same maths
    as ``torch.autograd.grad`` (tests/test_sa.py). The reference loop's; the fast loop calls
    :func:`_kl2_and_input_grad`."""
    a, saved = s_hat, []
    for m in layers:
        if type(m) is nn.Linear:
            a = torch.addmm(m.bias, a, m.weight.t())
        elif type(m) is nn.Tanh:
            # tanh(x) = 2σ(2x) − 1 (within 2e-7 of torch.tanh): on the CPU torch's own tanh costs
            # ~4× a sigmoid here (83 vs 21 µs for 64×256, AMD EPYC, torch 2.13)
            a = torch.tanh(a) if a.is_cuda else torch.sigmoid(a * 2).mul_(2).sub_(1)
            saved.append(1 - a * a)           # tanh' = 1 − tanh²
        else:
            saved.append((a > 0).to(a.dtype))  # relu' (0 at 0, as autograd)
            a = torch.relu(a)
    diff = (a - mean) / std
    kl = 0.5 * diff.pow(2).sum(-1)
    g = diff / std                             # ∂KL/∂μ(ŝ)
    for m in reversed(layers):
        if type(m) is nn.Linear:
            g = g @ m.weight
        else:
            g = g * saved.pop()
    return kl, g


#: How ∂KL/∂ŝ is computed (``max_kl_perturbation(input_gradient=...)``): ``auto`` the fast path
#: (:func:`_kl2_and_input_grad`) for a plain tanh/ReLU MLP, else autograd; ``reference`` the loop as
#: it was before the fast path (hand-written gradient in torch ops); ``autograd`` always autograd.
INPUT_GRADIENTS = ("auto", "reference", "autograd")

#: A Linear layer with at least this many weights runs on oneDNN in the fast path (CPU, float32).
#: Measured (AMD EPYC Zen 5, a shared 2-core machine, torch 2.13, one thread, 64 rows;
#: benchmarks/sa_update.py times the whole loop): 256×256 MKL addmm 88 µs vs oneDNN 53 µs (59 µs with the tanh fused; MKL
#: takes no AVX-512 path on AMD); oneDNN's ~12 µs fixed cost per call loses below ~64×256 (64×64:
#: addmm 8 µs vs 15 µs). The rule is on shapes only, so a run's arithmetic does not depend on timing.
ONEDNN_MIN_WEIGHTS = 16384


@functools.cache
def _onednn_linear():
    """``torch.ops.mkldnn._linear_pointwise`` (oneDNN's linear with a fused activation, the op
    Inductor's CPU backend calls) if this torch build has a working one, else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4)
        ok = torch.equal(op(x, w, b, "tanh", [], ""), torch.full((2, 4), 3.0).tanh())
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return op if ok else None


def _fast_plan(mean_fn) -> list[tuple] | None:
    """``[(W, b, activation, onednn)]`` per Linear of ``mean_fn`` (activation ``"tanh"``/``"relu"`` of
    the layer after it, ``"none"`` for the output layer; ``onednn``: run this layer on oneDNN) if it
    is a plain MLP Linear, act, …, Linear; else None. The tensors are the parameters themselves, read
    at call time: pruning masks weights in place, so pruned weights are the zeros used here."""
    net = plain_mlp(mean_fn)
    if net is None:
        return None
    layers = list(net)
    op = _onednn_linear()
    plan = []
    for i in range(0, len(layers), 2):
        w = layers[i].weight
        act = "none" if i + 1 == len(layers) else ("tanh" if type(layers[i + 1]) is nn.Tanh else "relu")
        onednn = (op is not None and w.device.type == "cpu" and w.dtype == torch.float32
                  and w.numel() >= ONEDNN_MIN_WEIGHTS)
        plan.append((w, layers[i].bias, act, onednn))
    return plan


@torch.no_grad()
def _kl2_and_input_grad(plan: list[tuple], s_hat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        grad: bool, one: torch.Tensor, two: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """2·KL(π(·|s) ‖ π(·|ŝ)) per state and ∂KL/∂ŝ (None unless ``grad``): the maths of
    :func:`_kl_and_input_grad` — one forward, one hand-written backward, no autograd graph — with
    the big layers on oneDNN (activation fused into the matmul) and no derivatives kept for a
    forward whose gradient is not wanted. Where no layer uses oneDNN its ops are the reference's
    op for op, and the result is bitwise the same (tests/test_sa.py). 2·KL, not KL: the loop only
    compares them, and halves the best one at the end (exact in floating point). ``one``/``two``:
    1 and 2 as 0-dim tensors of ``s_hat``'s dtype — the same arithmetic as Python numbers, without
    wrapping a number into a tensor in every op (~1.5 µs each)."""
    op = _onednn_linear()
    a, ders = s_hat, []
    for w, b, act, onednn in plan[:-1]:
        if onednn:
            a = op(a, w, b, act, [], "")
        else:
            a = torch.addmm(b, a, w.t()) if b is not None else a @ w.t()
            if act == "relu":
                a = torch.relu(a)
            else:  # tanh(x) = 2σ(2x) − 1 on the CPU, as in _kl_and_input_grad
                a = torch.tanh(a) if a.is_cuda else torch.sigmoid(a * two).mul_(two).sub_(one)
        if grad:  # tanh' = 1 − tanh²; relu' = [x > 0] (0 at 0, as autograd), and relu(x) > 0 ⟺ x > 0
            ders.append(one - a * a if act == "tanh" else (a > 0).to(a.dtype))
    w, b, _, onednn = plan[-1]
    if onednn:
        a = op(a, w, b, "none", [], "")
    else:
        a = torch.addmm(b, a, w.t()) if b is not None else a @ w.t()
    diff = (a - mean) / std
    kl2 = diff.pow(2).sum(-1)
    if not grad:
        return kl2, None
    g = diff / std                             # ∂KL/∂μ(ŝ)
    for (w, _, _, onednn), d in zip(reversed(plan), [None, *reversed(ders)]):
        if d is not None:
            g = g * d
        g = op(g, w.t(), None, "none", [], "") if onednn else g @ w
    return kl2, g


@torch.no_grad()
def _max_kl_fast(plan: list[tuple], obs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float,
                 alpha: float, steps: int, random_start: bool, noise: float,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop of :func:`_max_kl_perturbation_reference` on :func:`_kl2_and_input_grad`, with the
    same random draws in the same order and only exact rewrites of its arithmetic (ŝ + α·sign(g)
    as one add: α·sign(g) is exact)."""
    lo, hi = obs - eps, obs + eps

    def rand_like(x):
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)

    s_hat = (obs + alpha * rand_like(obs).sign()).clamp(lo, hi) if random_start else obs.clone()
    best, best_kl2 = s_hat, torch.full(obs.shape[:-1], -2.0, device=obs.device)
    one, two, scale = (torch.tensor(x, dtype=obs.dtype, device=obs.device)
                       for x in (1.0, 2.0, (2 * alpha) ** 0.5 * noise))
    for i in range(steps + 1):
        kl2, grad = _kl2_and_input_grad(plan, s_hat, mean, std, i < steps, one, two)
        better = kl2 > best_kl2
        best = torch.where(better.unsqueeze(-1), s_hat, best)
        best_kl2 = torch.where(better, kl2, best_kl2)
        if grad is None:
            break
        if noise > 0:
            grad = grad + scale * rand_like(grad)
        s_hat = torch.add(s_hat, grad.sign(), alpha=alpha).clamp_(lo, hi)  # a new tensor: best keeps its own
    return best, best_kl2 * 0.5


def max_kl_perturbation(mean_fn: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                        std: torch.Tensor, eps: float, steps: int = 10,
                        step_size: float | None = None, random_start: bool = True,
                        noise: float = 1e-5, generator: torch.Generator | None = None,
                        mean: torch.Tensor | None = None,
                        input_gradient: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Approximately solve max_{‖ŝ−s‖∞≤ε} KL(π(·|s) ‖ π(·|ŝ)) for a batch of states.

    Returns ``(s_hat, kl)``: the perturbed states (detached, inside the ball) and their KL.
    Gradients of ``mean_fn``'s parameters are not touched. ``mean``, when given, is μ(s) already
    computed by the caller (it is detached here), saving one forward pass. ``input_gradient``
    (one of :data:`INPUT_GRADIENTS`): ``"auto"`` writes ∂KL/∂ŝ out by hand on the fast path when
    ``mean_fn`` is a plain tanh/ReLU MLP (or a GaussianActor around one) and uses
    ``torch.autograd.grad`` otherwise; ``"reference"`` runs the loop as it was before the fast path
    and ``"autograd"`` forces autograd (the references the fast path is tested against).
    """
    if input_gradient not in INPUT_GRADIENTS:
        raise ValueError(f"input_gradient={input_gradient!r} is not allowed; allowed: {list(INPUT_GRADIENTS)}")
    plan = _fast_plan(mean_fn) if input_gradient == "auto" else None
    if plan is None:
        return _max_kl_perturbation_reference(mean_fn, obs, std, eps, steps, step_size, random_start, noise,
                                              generator, mean, "autograd" if input_gradient == "auto"
                                              else input_gradient)
    obs = obs.detach()
    alpha = eps / 10 if step_size is None else step_size
    if mean is None:
        with torch.no_grad():
            mean = mean_fn(obs)
    if eps == 0 or steps == 0 and not random_start:
        return obs.clone(), torch.zeros(obs.shape[:-1], device=obs.device)
    return _max_kl_fast(plan, obs, mean.detach(), std.detach(), eps, alpha, steps, random_start, noise, generator)


def _max_kl_perturbation_reference(mean_fn: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                                   std: torch.Tensor, eps: float, steps: int = 10,
                                   step_size: float | None = None, random_start: bool = True,
                                   noise: float = 1e-5, generator: torch.Generator | None = None,
                                   mean: torch.Tensor | None = None,
                                   input_gradient: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """The inner loop as it was before the fast path (kept as the reference it is tested and
    benchmarked against; ``max_kl_perturbation(..., input_gradient="reference"|"autograd")``).
    ``"reference"``: ∂KL/∂ŝ by :func:`_kl_and_input_grad` for a plain MLP, else autograd;
    ``"autograd"``: always ``torch.autograd.grad``."""
    layers = _mlp_layers(mean_fn) if input_gradient == "reference" else None
    obs = obs.detach()
    alpha = eps / 10 if step_size is None else step_size
    if mean is None:
        with torch.no_grad():
            mean = mean_fn(obs)
    mean = mean.detach()
    std = std.detach()
    if eps == 0 or steps == 0 and not random_start:
        return obs.clone(), torch.zeros(obs.shape[:-1], device=obs.device)
    lo, hi = obs - eps, obs + eps

    def rand_like(x):
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)

    s_hat = (obs + alpha * rand_like(obs).sign()).clamp(lo, hi) if random_start else obs.clone()
    best = s_hat.clone()
    best_kl = torch.full(obs.shape[:-1], -1.0, device=obs.device)
    for _ in range(steps + 1):
        if layers is not None:
            kl, grad = _kl_and_input_grad(layers, s_hat, mean, std)
            grad = grad if _ < steps else None
        else:
            s_hat.requires_grad_(True)
            with torch.enable_grad():
                kl = gaussian_kl(mean, mean_fn(s_hat), std)
                grad = torch.autograd.grad(kl.sum(), s_hat)[0] if _ < steps else None
        with torch.no_grad():
            # torch.where rather than boolean-mask assignment: same result, no nonzero()/index_put
            better = kl > best_kl
            best = torch.where(better.unsqueeze(-1), s_hat, best)
            best_kl = torch.where(better, kl, best_kl)
            if grad is None:
                break
            if noise > 0:
                grad = grad + (2 * alpha) ** 0.5 * noise * rand_like(grad)
            s_hat = (s_hat + alpha * grad.sign()).clamp(lo, hi)
    return best.detach(), best_kl.detach()


def kl_upper_bound(mean_fn, obs: torch.Tensor, std: torch.Tensor, eps: float, beta: float,
                   mean: torch.Tensor | None = None) -> torch.Tensor:
    """Per state (B,): an upper bound on max_{ŝ∈B∞(s,ε)} KL(π(·|s) ‖ π(·|ŝ)) by convex relaxation,
    ½ Σ_j (max(|u_j − μ_j(s)|, |l_j − μ_j(s)|)/σ_j)² with l ≤ μ(ŝ) ≤ u from
    ``prunerl.certify.mixed_output_bounds`` (β·CROWN-IBP + (1 − β)·IBP), in the parameters' dtype
    and differentiable w.r.t. them; μ(s) (``mean`` if given, else computed) and σ detached. ε = 0
    gives exact zeros (the ball is the point s). Only for a plain Linear/Tanh/ReLU MLP (or a
    GaussianActor around one)."""
    from prunerl.certify import mixed_output_bounds

    net = plain_mlp(mean_fn)
    if net is None:
        raise ValueError(f"algo.sa.method=convex bounds a plain MLP of nn.Linear and nn.Tanh/nn.ReLU layers "
                         f"(prunerl.models.mlp); got {type(mean_fn).__name__}")
    if mean is None:
        with torch.no_grad():
            mean = mean_fn(obs)
    mean, std = mean.detach(), std.detach()
    if eps == 0:
        return torch.zeros(obs.shape[:-1], dtype=mean.dtype, device=mean.device)
    lower, upper = mixed_output_bounds(net, obs, eps, beta)
    dev = torch.maximum((upper - mean).abs(), (lower - mean).abs())
    return 0.5 * (dev / std).pow(2).sum(-1)


def sa_regularizer_convex(mean_fn, obs: torch.Tensor, std: torch.Tensor, eps: float, beta: float,
                          mean: torch.Tensor | None = None) -> torch.Tensor:
    """R_SA(θ; B) for ``algo.sa.method=convex``: mean_s of :func:`kl_upper_bound` (the certified
    upper bound of the max-KL, minimised instead of the max found by SGLD)."""
    return kl_upper_bound(mean_fn, obs, std, eps, beta, mean=mean).mean()


def sa_regularizer(mean_fn: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                   std: torch.Tensor, eps: float, steps: int, step_size: float | None,
                   mean: torch.Tensor | None = None,
                   input_gradient: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """R_SA(θ; B) = mean_s KL(π(·|s) ‖ π(·|ŝ*)) with ŝ* from :func:`max_kl_perturbation`.

    μ(s) is detached (as in the SA-PPO reference); the gradient flows through μ(ŝ*).
    ``mean``, when given, is μ(s) as the caller computed it (detached here). ``input_gradient``
    picks the inner loop's implementation (:data:`INPUT_GRADIENTS`).
    Returns ``(loss, max_kl_found)``.
    """
    if mean is None:
        with torch.no_grad():
            mean = mean_fn(obs)
    mean = mean.detach()
    s_hat, kl_found = max_kl_perturbation(mean_fn, obs, std, eps, steps, step_size, mean=mean,
                                           input_gradient=input_gradient)
    return gaussian_kl(mean, mean_fn(s_hat), std.detach()).mean(), kl_found.mean()
