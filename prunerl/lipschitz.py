"""Lipschitz maths (Sec. 3, Thm. 1, Lemma 1, Thm. 3): the surrogate L̃, the exact spectral product,
local Jacobian norms, the certified bound and the path-averaged parameter sensitivity L_par.

The ball. Appendix B proves ‖f(ŝ)−f(s)‖₂ ≤ L̃·‖ŝ−s‖₂: an ℓ2 ball. The attacks and the SA
regulariser perturb within the ℓ∞ ball ‖ŝ−s‖∞ ≤ ε, whose ℓ2 radius is √d·ε (d the observation
dimension), so α·c·L̃·ε understates their bound by up to √d. ``ball="linf"`` gives the figures
for the ℓ∞ ball: only the first layer sees the input perturbation δ, and for ‖δ‖∞ ≤ ε

    ‖W₁δ‖₂ ≤ ε·‖ |W₁|·𝟙 ‖₂        (|(W₁δ)_i| ≤ Σ_j |W₁,ij|·|δ_j|)

(:func:`linf_to_l2_norm`), so L̃_∞ = ∏ L_σℓ · ‖|W₁|𝟙‖₂ · ∏_{ℓ≥2} min(‖W_ℓ‖_F, sqrt(‖W_ℓ‖_1 ‖W_ℓ‖_∞))
bounds ‖f(ŝ)−f(s)‖₂ ≤ L̃_∞·‖ŝ−s‖∞. ‖|W₁|𝟙‖₂ lies in [‖W₁‖_F, √d·min(‖W₁‖_F, sqrt(‖W₁‖_1 ‖W₁‖_∞))],
so L̃ ≤ L̃_∞ ≤ √d·L̃ (never looser than the √d·ε radius), and it is monotone in |W_ij| (Thm. 1's
"pruning cannot loosen the bound" holds for it too).

One home for each formula: the Lipschitz callback, the report and the tests call these. No
Lightning, no Hydra. Networks are ``nn.Sequential`` stacks of ``nn.Linear`` and 1-Lipschitz
activations (tanh, ReLU), the shape of ``prunerl.models.mlp``; every function also takes the layer
weights explicitly (``weights=[W_1, …, W_L]``) so a caller can evaluate a network at other
parameters (before a mask update, along the pruning path) without copying modules.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# L_σ of each supported activation (Thm. 1's ∏ L_σℓ); both are 1-Lipschitz.
ACTIVATION_LIPSCHITZ = {nn.Tanh: 1.0, nn.ReLU: 1.0}

# The perturbation balls ‖ŝ−s‖_p ≤ ε a figure can be stated for: "l2" (Appendix B's ball) and
# "linf" (the attacks' and the SA regulariser's ball).
BALLS = ("linf", "l2")


def _check_ball(ball: str) -> None:
    if ball not in BALLS:
        raise ValueError(f"ball={ball!r} is not allowed; allowed: {list(BALLS)}")


def mlp_parts(net: nn.Sequential) -> tuple[list[nn.Linear], list[nn.Module]]:
    """The Linear layers of ``net`` in order and the activation after each hidden one."""
    linears, acts = [], []
    for m in net:
        if isinstance(m, nn.Linear):
            linears.append(m)
        elif type(m) in ACTIVATION_LIPSCHITZ:
            acts.append(m)
        else:
            raise TypeError(f"{type(m).__name__} in the network: expected nn.Linear and "
                            f"{[a.__name__ for a in ACTIVATION_LIPSCHITZ]} only")
    if len(acts) != len(linears) - 1:
        raise TypeError(f"expected one activation between consecutive Linear layers, got "
                        f"{len(linears)} Linear and {len(acts)} activations")
    return linears, acts


def activation_product(net: nn.Sequential) -> float:
    """∏_ℓ L_σℓ over the hidden activations."""
    return math.prod(ACTIVATION_LIPSCHITZ[type(a)] for a in mlp_parts(net)[1])


def surrogate_norm(w: torch.Tensor) -> torch.Tensor:
    """min(‖W‖_F, sqrt(‖W‖_1 ‖W‖_∞)) (float64 result); ‖W‖_1 = max column sum, ‖W‖_∞ = max row
    sum of |W|. Both are monotone in |W_ij|, so zeroing entries never raises it (Thm. 1) — also
    in floating point: the reductions add the same terms in the same order, some replaced by 0,
    and rounding is monotone."""
    a = w.detach().abs()
    fro = torch.linalg.vector_norm(a).double()
    one, inf = a.sum(0).max().double(), a.sum(1).max().double()
    return torch.minimum(fro, (one * inf).sqrt())


def linf_to_l2_norm(w: torch.Tensor) -> torch.Tensor:
    """‖ |W|·𝟙 ‖₂ (float64): the ℓ2 norm of W's row ℓ1-norms, an upper bound on W's ℓ∞→ℓ2
    operator norm max_{‖x‖∞≤1} ‖Wx‖₂, since |(Wx)_i| ≤ ‖x‖∞·Σ_j |W_ij|. It is ≥ ‖W‖_F (each row's
    ℓ1 norm is ≥ its ℓ2 norm), ≤ √n·min(‖W‖_F, sqrt(‖W‖_1 ‖W‖_∞)) for n input columns (Cauchy–
    Schwarz; ‖|W|𝟙‖₂ ≤ ‖|W|‖₂·‖𝟙‖₂), and monotone in |W_ij| — also in floating point: sums of
    non-negative terms, a square root, and rounding is monotone."""
    return w.detach().abs().double().sum(-1).pow(2).sum(-1).sqrt()


@torch.no_grad()
def lipschitz_surrogate(net: nn.Sequential, weights: list[torch.Tensor] | None = None,
                        ball: str = "l2") -> float:
    """Thm. 1: L̃ = ∏ L_σℓ · ∏ min(‖W_ℓ‖_F, sqrt(‖W_ℓ‖_1 ‖W_ℓ‖_∞)), with ‖f(ŝ)−f(s)‖₂ ≤ L̃·‖ŝ−s‖₂
    (``ball="l2"``, Appendix B). ``ball="linf"``: L̃_∞, the first layer's factor replaced by
    ‖|W₁|𝟙‖₂ (:func:`linf_to_l2_norm`), with ‖f(ŝ)−f(s)‖₂ ≤ L̃_∞·‖ŝ−s‖∞ — the figure for the
    attacks' ℓ∞ ball; L̃ ≤ L̃_∞ ≤ √d·L̃. ``weights`` overrides the network's own weight matrices
    (same shapes, same order)."""
    _check_ball(ball)
    ws = weights if weights is not None else [m.weight for m in mlp_parts(net)[0]]
    norms = [surrogate_norm(w) for w in ws]
    if ball == "linf":
        norms[0] = linf_to_l2_norm(ws[0])
    return activation_product(net) * float(torch.stack(norms).prod())


@torch.no_grad()
def spectral_product(net: nn.Sequential, weights: list[torch.Tensor] | None = None) -> float:
    """∏ L_σℓ · ∏ ‖W_ℓ‖_2 with exact spectral norms: tighter than L̃, but *not* monotone under
    pruning ([[1,1],[1,−1]] has ‖·‖_2 = 1.414, [[1,1],[1,0]] has 1.618)."""
    ws = weights if weights is not None else [m.weight for m in mlp_parts(net)[0]]
    norms = []
    for w in ws:
        w = w.detach()
        # λ_max of the smaller Gram matrix: exact (a dense eigensolver, not an iterative
        # estimate), and ~2× cheaper than an SVD; float32 is plenty for the top eigenvalue
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        norms.append(torch.linalg.eigvalsh(g)[-1].double().clamp_min(0).sqrt())
    return activation_product(net) * float(torch.stack(norms).prod())


def _signals(net: nn.Sequential, states: torch.Tensor, weights: list[torch.Tensor] | None,
             biases: list[torch.Tensor] | None = None):
    """Forward pass keeping each layer's input a_{ℓ−1}, and the backward signals
    δ_ℓ[b, k, :] = ∂μ_k(s_b)/∂z_ℓ for every output k (z_ℓ the pre-activation of layer ℓ)."""
    linears, acts = mlp_parts(net)
    ws = weights if weights is not None else [m.weight for m in linears]
    bs = biases if biases is not None else [m.bias for m in linears]
    with torch.no_grad():
        inputs, derivs = [], []
        a = states
        for i, (w, b) in enumerate(zip(ws, bs)):
            inputs.append(a)
            z = a @ w.T + b
            if i < len(acts):
                if isinstance(acts[i], nn.Tanh):
                    a = torch.tanh(z)
                    derivs.append(1 - a * a)
                else:
                    a = torch.relu(z)
                    derivs.append((z > 0).to(z.dtype))
        out_dim = ws[-1].shape[0]
        delta = torch.eye(out_dim, dtype=states.dtype, device=states.device).expand(states.shape[0], -1, -1)
        deltas = [delta]
        for i in range(len(ws) - 1, 0, -1):
            delta = (delta @ ws[i]) * derivs[i - 1].unsqueeze(1)
            deltas.append(delta)
        deltas.reverse()  # deltas[ℓ]: (B, out, width of layer ℓ's output)
    return ws, inputs, deltas


@torch.no_grad()
def input_jacobians(net: nn.Sequential, states: torch.Tensor,
                    weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """J(s) = ∂μ(s)/∂s for a batch of states: (B, out_dim, in_dim)."""
    ws, _, deltas = _signals(net, states, weights)
    return deltas[0] @ ws[0]


@torch.no_grad()
def jacobian_norms(net: nn.Sequential, states: torch.Tensor,
                   weights: list[torch.Tensor] | None = None, ball: str = "l2") -> torch.Tensor:
    """Lemma 1's leading factor for each state of the batch: ``ball="l2"``: ‖J(s)‖_op (spectral),
    with ‖J(s)δ‖₂ ≤ ‖J(s)‖_op·‖δ‖₂; ``ball="linf"``: ‖|J(s)|𝟙‖₂ (:func:`linf_to_l2_norm` of J(s)),
    with ‖J(s)δ‖₂ ≤ ‖|J(s)|𝟙‖₂·‖δ‖∞."""
    _check_ball(ball)
    j = input_jacobians(net, states, weights).double()
    if ball == "linf":
        return linf_to_l2_norm(j)
    return torch.linalg.eigvalsh(j @ j.transpose(1, 2))[..., -1].clamp_min(0).sqrt()


@torch.no_grad()
def parameter_sensitivity(net: nn.Sequential, states: torch.Tensor,
                          weights: list[torch.Tensor] | None = None) -> float:
    """L̂^par_φ = (E_s ‖J_φ g_φ(s)‖²_op)^{1/2} (Lemma 3), J_φ the Jacobian of the mean with respect
    to all the network's parameters (weights and biases), ‖·‖_op its spectral norm.

    For a Linear layer ∂μ_k/∂W_ℓ = δ_ℓ,k ⊗ a_{ℓ−1} and ∂μ_k/∂b_ℓ = δ_ℓ,k, so the (out × out) Gram
    matrix J Jᵀ is Σ_ℓ (δ_ℓ δ_ℓᵀ)(‖a_{ℓ−1}‖² + 1) — exact, without materialising J."""
    _, inputs, deltas = _signals(net, states, weights)
    gram = 0
    for a, d in zip(inputs, deltas):
        d = d.double()
        gram = gram + (d @ d.transpose(1, 2)) * (a.double().pow(2).sum(-1) + 1.0)[:, None, None]
    lam = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0)
    return float(lam.mean().sqrt())


@torch.no_grad()
def path_sensitivity(net: nn.Sequential, states: torch.Tensor, theta: list[torch.Tensor],
                     theta_pruned: list[torch.Tensor], points: int = 4) -> float:
    """L_par(θ, θ′) = ∫_0^1 L̂^par at φ = θ′ + t(θ − θ′) dt (Thm. 3), by Gauss–Legendre quadrature
    with ``points`` nodes; θ, θ′ are the weight matrices before and after pruning (biases are
    not pruned, so they stay where they are along the path)."""
    nodes, wts = np.polynomial.legendre.leggauss(points)
    total = 0.0
    for x, wq in zip(nodes, wts):
        t = 0.5 * (x + 1.0)
        phi = [p + t * (q - p) for q, p in zip(theta, theta_pruned)]
        total += 0.5 * wq * parameter_sensitivity(net, states, phi)
    return total


def parameter_distance(theta: list[torch.Tensor], theta_pruned: list[torch.Tensor]) -> float:
    """‖Δθ‖ (Euclidean over all the entries)."""
    return float(torch.stack([(q.double() - p.double()).pow(2).sum() for q, p in zip(theta, theta_pruned)]).sum().sqrt())


def robustness_alpha(gamma: float, r_max: float) -> float:
    """α = 2[1 + γ/(1−γ)²]·R_max (Sec. 3.1)."""
    return 2.0 * (1.0 + gamma / (1.0 - gamma) ** 2) * r_max


def gaussian_c(std: torch.Tensor | float) -> float:
    """c = 1/sqrt(2π λ_min(Σ)) for Σ = diag(σ²) (App. B's form; the main text's
    (sqrt(2π) λ_min)^-1 is a misprint)."""
    lam_min = float(torch.as_tensor(std).detach().double().pow(2).min())
    return 1.0 / math.sqrt(2.0 * math.pi * lam_min)


def certified_bound(lipschitz: float, eps: float, gamma: float, r_max: float, std) -> float:
    """Thm. 1: max_s {V − Ṽ} ≤ α·c·L·ε, for perturbations within the ball of radius ε in which
    ‖μ(ŝ)−μ(s)‖₂ ≤ L·ε: pass ``lipschitz_surrogate(net, ball="linf")`` for the ℓ∞ ball the
    attacks use, ``lipschitz_surrogate(net)`` (Appendix B's L̃) for an ℓ2 ball."""
    return robustness_alpha(gamma, r_max) * gaussian_c(std) * lipschitz * eps
