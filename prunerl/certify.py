"""Per-state certificates (issue 14, item 1): sound upper bounds, for each visited normalised state
s, on how far the policy's mean can move inside the attacks' ball,

    Δ(s) = max_{ŝ ∈ B∞(s, ε)} ‖μ(ŝ) − μ(s)‖₂,        B∞(s, ε) = {ŝ : ‖ŝ − s‖∞ ≤ ε},

and from them a certified total-variation bound per state, c·Δ(s) ≥ max_ŝ TV(π(·|s), π(·|ŝ))
(Lemma 1's Gaussian step, App. B: TV ≤ ‖μ(ŝ) − μ(s)‖₂ / sqrt(2π λ_min(Σ)) = c·‖Δμ‖₂).

The global figure of Thm. 1 for the same ball is L̃_∞·ε (``prunerl.lipschitz``, ``ball="linf"``): it
holds at every state at once, which is why it is loose. Here each output coordinate j of
μ(ŝ) − μ(s) is bounded over the ball, l_j ≤ μ_j(ŝ) − μ_j(s) ≤ u_j, and

    Δ(s) ≤ sqrt(Σ_j max(|l_j|, |u_j|)²)                                    (:func:`deviation_bound`)

by two methods for ``nn.Sequential`` stacks of Linear and tanh / ReLU (``prunerl.models.mlp``; a
pruned network's masked entries are zeros of its weights, nothing special is needed):

- ``ibp``: interval bound propagation — the box of each layer's pre-activations, through the
  monotone activations, through |W|;
- ``crown``: backward linear bounds (CROWN, Zhang et al. 2018). Each activation σ(z) on its
  pre-activation interval [l, u] is sandwiched between two lines k_L z + b_L ≤ σ(z) ≤ k_U z + b_U;
  the output (and, for the intermediate intervals, each hidden pre-activation) is bounded by
  back-substituting them from the top layer to the input, and the resulting linear function of ŝ
  is maximised over the ball in closed form (A ŝ + c ≤ A s + c + ε‖A‖₁ row by row). Intermediate
  intervals come from CROWN itself (full CROWN, not CROWN-IBP), **intersected with the interval
  propagated from the layer below** — and the output interval is intersected with IBP's. So every
  interval is inside IBP's: CROWN ≤ IBP per state by construction (plain CROWN is not always
  tighter than IBP; ``intersect=False`` gives it, for diagnostics).

Soundness of the relaxations does not rest on the choice of slopes: for a slope k the intercepts
are b_U = max_{z∈[l,u]} σ(z) − kz and b_L = min of the same, computed exactly from the endpoints
and the interior critical points (tanh: σ'(z) = k at z = ±atanh(sqrt(1 − k)); ReLU: the kink at
0). The slopes only decide tightness: ReLU takes the triangle's upper chord and the adaptive lower
slope (1 if u > −l, else 0); tanh takes the chord on its convex side, the tangent at the midpoint
on its concave side, and, across 0, the tangent that passes through the far endpoint (found by
bisection), as CROWN does.

Everything is computed in float64. IBP's output box is never wider than |W_L|⋯|W_1|𝟙·ε around
μ(s), so IBP ≤ L̃_∞·ε (‖|W|‖₂ ≤ min(‖W‖_F, sqrt(‖W‖_1 ‖W‖_∞))), and hence CROWN ≤ IBP ≤ L̃_∞·ε.

The SA regulariser's bounds (``algo.sa.method=convex``, issue 14 item 2) live here too, on the same
relaxations: :func:`mixed_output_bounds` is β·CROWN-IBP + (1 − β)·IBP (CROWN-IBP: IBP's hidden
intervals, CROWN's back-substitution for the output only, :func:`crown_ibp_bounds`) in the network's
own dtype and differentiable w.r.t. its weights — slopes included, tanh's crossing tangents read from
a table instead of bisected; IBP's box in centre-radius form so a pruned (zero) weight gets a
subgradient. Float32 rounding makes those a training objective; the certificates are float64.

No Lightning, no Hydra: the Lipschitz callback, ``benchmarks/certificates.py`` and the tests call
these functions.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from prunerl.lipschitz import mlp_parts

METHODS = ("ibp", "crown")

# bisection steps for the tangent point of tanh's crossing relaxation (tightness only: soundness
# comes from the exact intercepts); 20 halvings of [0, u] pin the tangent point to ~1e-6·u
_BISECTION_STEPS = 20


def check_methods(methods, key: str = "methods") -> tuple[str, ...]:
    """``methods`` as a tuple of names from :data:`METHODS`, or a ValueError naming the bad value."""
    if isinstance(methods, str):
        methods = [methods]
    try:
        out = tuple(methods)
    except TypeError:
        raise ValueError(f"{key}={methods!r} must be a list of certificate methods from {list(METHODS)}") from None
    bad = [m for m in out if m not in METHODS]
    if bad:
        raise ValueError(f"{key}={list(out)!r}: {bad[0]!r} is not a certificate method; allowed: {list(METHODS)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{key}={list(out)!r} names a method twice")
    return out


def _check_eps(eps) -> float:
    e = float(eps)
    if not math.isfinite(e) or e < 0:
        raise ValueError(f"eps={eps!r} must be a finite number ≥ 0 (the ℓ∞ radius of the ball)")
    return e


def _layers(net: nn.Sequential, weights, biases, differentiable: bool = False):
    """(weights, biases, relu flags) of ``net``: detached float64 copies for the certificates, or
    with ``differentiable`` the parameters themselves (their dtype, in the autograd graph)."""
    linears, acts = mlp_parts(net)
    ws = weights if weights is not None else [m.weight for m in linears]
    bs = biases if biases is not None else [m.bias for m in linears]
    if not differentiable:
        ws = [w.detach().double() for w in ws]
        bs = [b.detach().double() if b is not None else None for b in bs]
    bs = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for w, b in zip(ws, bs)]
    relu = [isinstance(a, nn.ReLU) for a in acts]
    return ws, bs, relu


def _act(z: torch.Tensor, relu: bool) -> torch.Tensor:
    return torch.relu(z) if relu else torch.tanh(z)


def _affine_box(w: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """The box of W·x + b over the box lo ≤ x ≤ hi, in centre-radius form (Gowal et al. 2018):
    W·mid + b ± |W|·rad. The same box as W⁺ picking one end and W⁻ the other, to rounding; unlike
    that split (whose clamps both pass a gradient at 0), its gradient at a zero (pruned) weight is
    0, a subgradient of the kink there — the SA regulariser differentiates through it."""
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    centre, radius = mid @ w.T + b, rad @ w.abs().T
    return centre - radius, centre + radius


def _forward(ws, bs, relu, x):
    for i, (w, b) in enumerate(zip(ws, bs)):
        x = x @ w.T + b
        if i < len(relu):
            x = _act(x, relu[i])
    return x


def _prepare(net, states, eps, weights, biases, differentiable: bool = False):
    eps = _check_eps(eps)
    ws, bs, relu = _layers(net, weights, biases, differentiable)
    s = states.detach().to(ws[0].dtype)
    if s.dim() != 2 or s.shape[1] != ws[0].shape[1]:
        raise ValueError(f"states of shape {tuple(states.shape)}: expected (batch, {ws[0].shape[1]})")
    return eps, ws, bs, relu, s


# -- interval bound propagation -------------------------------------------------------------------
# The private helpers below are plain tensor maths (no ``no_grad``): the public float64 functions
# run them without gradients, :func:`mixed_output_bounds` (the SA regulariser's) with them.
def _ibp_boxes(ws, bs, relu, s, eps):
    """[(l, u)] of every layer's pre-activation z_ℓ over the ball, by IBP."""
    lo, hi = s - eps, s + eps
    boxes = []
    for i, (w, b) in enumerate(zip(ws, bs)):
        zl, zu = _affine_box(w, b, lo, hi)
        boxes.append((zl, zu))
        if i < len(relu):
            lo, hi = _act(zl, relu[i]), _act(zu, relu[i])  # monotone activations
    return boxes


@torch.no_grad()
def interval_bounds(net: nn.Sequential, states: torch.Tensor, eps: float, weights=None, biases=None):
    """IBP: (lower, upper), each (B, out), with lower ≤ μ(ŝ) − μ(s) ≤ upper for every ŝ in B∞(s, ε)
    (float64). ``weights``/``biases`` override the network's own (as in ``prunerl.lipschitz``)."""
    eps, ws, bs, relu, s = _prepare(net, states, eps, weights, biases)
    zl, zu = _ibp_boxes(ws, bs, relu, s, eps)[-1]
    mu = _forward(ws, bs, relu, s)
    return (zl - mu).clamp(max=0), (zu - mu).clamp(min=0)  # ŝ = s is in the ball: 0 is inside


# -- linear relaxations ---------------------------------------------------------------------------
def _tangent_residual(t, l, tanh_l):
    """f(t) = tanh t + tanh'(t)(l − t) − tanh l: zero where the tangent of tanh at t passes through (l, tanh l)."""
    th = torch.tanh(t)
    return th + (1 - th ** 2) * (l - t) - tanh_l


# the tangent-point table of the training bounds: t*(l) on a grid of l ∈ [−_TABLE_L, 0], step 1/_TABLE_PER_UNIT
_TABLE_L, _TABLE_PER_UNIT = 8.0, 256


@functools.cache
def _tangent_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """t*(l) for l on the grid −_TABLE_L, …, 0: the tangent point t > 0 of tanh's upper line through
    (l, tanh l) (the root of :func:`_tangent_residual`; it depends on l only, not on u), by 60
    halvings of [0, 4] in float64 (t*(−8) ≈ 1.5). Computed once per dtype and device, as auto_LiRPA
    tabulates its tanh tangents; a padding entry at the end lets the interpolation read i + 1."""
    n = int(_TABLE_L * _TABLE_PER_UNIT)
    l = torch.linspace(-_TABLE_L, 0.0, n + 1, dtype=torch.double)
    tl = torch.tanh(l)
    a, b = torch.zeros_like(l), torch.full_like(l, 4.0)
    for _ in range(60):
        m = (a + b) / 2
        pos = _tangent_residual(m, l, tl) >= 0
        a, b = torch.where(pos, a, m), torch.where(pos, m, b)
    return torch.cat([b, b[-1:]]).to(dtype=dtype, device=device)


def _tabulated_tangent_point(l: torch.Tensor) -> torch.Tensor:
    """t*(l) by linear interpolation in :func:`_tangent_table` (l clamped to [−_TABLE_L, 0]: below
    it the tangent at t*(−_TABLE_L) is used — looser there, never unsound, the intercept is exact)."""
    table = _tangent_table(l.dtype, l.device)
    x = (l.clamp(-_TABLE_L, 0.0) + _TABLE_L) * _TABLE_PER_UNIT
    i = x.floor().clamp(max=table.numel() - 2)
    lo = table[i.long()]
    return lo + (x - i) * (table[i.long() + 1] - lo)


def _tanh_upper_slope(l: torch.Tensor, u: torch.Tensor, tabulated: bool = False) -> torch.Tensor:
    """CROWN's slope of the upper line of tanh on [l, u] (any slope is sound with the exact intercept).
    ``tabulated`` (the training bounds): the crossing case's tangent point from
    :func:`_tangent_table` instead of a bisection per element — ~3x cheaper for 256-wide layers, a
    slope within ~1e-5 of the bisection's, and a differentiable function of l and u (no in-place
    writes), so the bound's gradient includes how the slopes move."""
    width = u - l
    tl, tu = torch.tanh(l), torch.tanh(u)
    mid = (l + u) / 2
    tangent_mid = 1 - torch.tanh(mid) ** 2
    # the chord where the interval is wide enough for it to be accurate (float32: a chord over 1e-3
    # is off by ~1e-4); the divisor is 1 elsewhere, so the unused branch has no inf in its gradient
    wide = width > (1e-12 if l.dtype == torch.float64 else 1e-3)
    chord = torch.where(wide, (tu - tl) / torch.where(wide, width, torch.ones_like(width)), tangent_mid)
    slope = torch.where(u <= 0, chord, tangent_mid)  # convex side: chord; concave side: tangent at the midpoint
    # crossing 0: the tangent at t ∈ (0, u] through (l, tanh l); f(t) = tanh t + tanh'(t)(l − t) − tanh l
    # rises with t (tanh'' < 0 on t > 0, l − t < 0), so bisect f = 0 on [0, u] (only where l < 0 < u);
    # if f(u) < 0 the tangent point lies beyond u and the chord is the tighter upper line
    cross = (l < 0) & (u > 0)
    if tabulated:  # the tangent point depends on l alone; beyond u (u < t*) the chord is tighter
        tp = _tabulated_tangent_point(l)
        return torch.where(cross, torch.where(u >= tp, 1 - torch.tanh(tp) ** 2, chord), slope)
    if cross.any():
        lc, uc, tlc = l[cross], u[cross], tl[cross]

        def f(t):
            return _tangent_residual(t, lc, tlc)
        a, b = torch.zeros_like(uc), uc.clone()
        for _ in range(_BISECTION_STEPS):
            m = (a + b) / 2
            pos = f(m) >= 0
            a, b = torch.where(pos, a, m), torch.where(pos, m, b)
        slope[cross] = torch.where(f(uc) < 0, chord[cross], 1 - torch.tanh(b) ** 2)
    return slope


def _relu_slopes(l: torch.Tensor, u: torch.Tensor):
    dead, live = u <= 0, l >= 0
    width = torch.where(u > l, u - l, torch.ones_like(u))  # used only where l < 0 < u; no inf elsewhere
    upper = torch.where(dead, 0.0, torch.where(live, 1.0, u / width))
    lower = torch.where(dead, 0.0, torch.where(live, 1.0, (u > -l).double()))
    return lower.to(l.dtype), upper.to(l.dtype)


def _intercept(relu: bool, l: torch.Tensor, u: torch.Tensor, k: torch.Tensor, act_l: torch.Tensor,
               act_u: torch.Tensor, upper: bool) -> torch.Tensor:
    """max (``upper``) or min over z ∈ [l, u] of σ(z) − k·z, exactly: over the endpoints (σ(l), σ(u)
    given) and the interior critical points (clipped into [l, u], so every candidate is a point of
    the interval). In float32, 1 − 1e-16 rounds to 1 and atanh gives ±inf, clipped to u / l."""
    if relu:
        inner = [torch.zeros_like(l).clamp(l, u)]
    else:
        # tanh'(z) = 1 − tanh²z = k at z = ±atanh(sqrt(1 − k)) (none when k ≤ 0 or k > 1); no
        # gradient through c: at an interior maximiser ∂/∂c (tanh c − k c) = 0 (envelope theorem),
        # and where c is clipped the gradient reaches l or u through the clip
        with torch.no_grad():
            c = torch.atanh((1 - k).clamp(0, 1 - 1e-16).sqrt())
        inner = [torch.minimum(torch.maximum(c, l), u), torch.minimum(torch.maximum(-c, l), u)]
    # one reduction over the stacked candidates (its backward is one scatter; a torch.maximum chain's
    # splits ties with masks, ~2x the whole bound's backward at 256 wide)
    h = torch.stack([act_l - k * l, act_u - k * u, *(_act(z, relu) - k * z for z in inner)])
    return (h.max(0) if upper else h.min(0)).values


def relaxation(relu: bool, l: torch.Tensor, u: torch.Tensor, tabulated: bool = False):
    """(k_L, b_L, k_U, b_U) with k_L z + b_L ≤ σ(z) ≤ k_U z + b_U for all z ∈ [l, u] (σ = ReLU or tanh).
    ``tabulated``: tanh's crossing tangents from a table (:func:`_tanh_upper_slope`; the training bounds').

    The slopes and intercepts are functions of l and u; with ``l``/``u`` in an autograd graph (the
    training bounds, ``tabulated``) the gradient flows through both: the slopes are heuristic, not
    optimal, so leaving their dependence out would give a partial derivative, not the bound's
    gradient (tests/test_sa_convex.py checks the gradient against finite differences). The
    bisection's slopes (certificates) carry no gradient."""
    if relu:
        k_lo, k_up = _relu_slopes(l, u)
    elif tabulated:
        k_up = _tanh_upper_slope(l, u, tabulated)
        k_lo = _tanh_upper_slope(-u, -l, tabulated)  # tanh is odd: the lower line on [l, u] mirrors the upper on [−u, −l]
    else:
        with torch.no_grad():
            k_up = _tanh_upper_slope(l, u)
            k_lo = _tanh_upper_slope(-u, -l)
    act_l, act_u = _act(l, relu), _act(u, relu)
    b_lo = _intercept(relu, l, u, k_lo, act_l, act_u, upper=False)
    b_up = _intercept(relu, l, u, k_up, act_l, act_u, upper=True)
    return k_lo, b_lo, k_up, b_up


def _scaled_product(a: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a·diag(k_b)·w for every state b: a (m, n) shared, k (B, n), w (n, p) → (B, m, p), as one
    matrix product over the batch; the per-state scaling is applied to whichever of a and w is
    smaller (a broadcast batched matmul is several times slower)."""
    m, p = a.shape[0], w.shape[1]
    if m <= p:
        return (a.unsqueeze(0) * k.unsqueeze(1)) @ w                        # (B, m, n) @ (n, p)
    x = k.unsqueeze(1) * w.T.contiguous().unsqueeze(0)                     # (B, p, n)
    b, _, n = x.shape
    return (x.reshape(b * p, n) @ a.T).reshape(b, p, m).transpose(1, 2)


def _substitute(a: torch.Tensor, k_pos, b_pos, k_neg, b_neg, w, bias):
    """One back-substitution step for per-state coefficients a (B, m, n) on σ(z_j): positive
    coefficients take the (k_pos, b_pos) line, negative ones the (k_neg, b_neg) line; then
    z_j = w·x + bias. Returns the coefficients on x (B, m, p) and the constant added (B, m)."""
    ap, an = a.clamp(min=0), a.clamp(max=0)
    a_eff = ap * k_pos.unsqueeze(1) + an * k_neg.unsqueeze(1)
    const = (ap * b_pos.unsqueeze(1)).sum(-1) + (an * b_neg.unsqueeze(1)).sum(-1) + a_eff @ bias
    return a_eff @ w, const


def _backward_bounds(ws, bs, relax, k: int, s: torch.Tensor, eps: float):
    """CROWN: (lower, upper) of z_k (layer k's pre-activation, or the output for the last k) over the
    ball, back-substituting the relaxations relax[k−1], …, relax[0] down to the input."""
    a_lo = a_up = ws[k]                                  # coefficients on σ(z_{k−1}); shared by the batch
    c_lo = c_up = bs[k].expand(s.shape[0], -1)           # (B, m)
    for j in range(k - 1, -1, -1):
        k_lo, b_lo, k_up, b_up = relax[j]                # (B, n) each
        if j == k - 1:
            # first step, a = W_k for both bounds. For the upper bound positive coefficients take
            # σ's upper line and negative ones its lower line: a⁺k_U + a⁻k_L = a·k̄ + |a|·k̃ with
            # k̄ = (k_U + k_L)/2, k̃ = (k_U − k_L)/2; the lower bound is a·k̄ − |a|·k̃ — two products,
            # not four
            a, a_abs = a_up, a_up.abs()
            k_mid, k_half = (k_up + k_lo) / 2, (k_up - k_lo) / 2
            b_mid, b_half = (b_up + b_lo) / 2, (b_up - b_lo) / 2
            mid = b_mid @ a.T + (k_mid * bs[j]) @ a.T
            half = b_half @ a_abs.T + (k_half * bs[j]) @ a_abs.T
            c_lo, c_up = c_lo + mid - half, c_up + mid + half
            s_mid, s_half = _scaled_product(a, k_mid, ws[j]), _scaled_product(a_abs, k_half, ws[j])
            a_lo, a_up = s_mid - s_half, s_mid + s_half
        else:
            a_lo, dc = _substitute(a_lo, k_lo, b_lo, k_up, b_up, ws[j], bs[j])
            c_lo = c_lo + dc
            a_up, dc = _substitute(a_up, k_up, b_up, k_lo, b_lo, ws[j], bs[j])
            c_up = c_up + dc
    # min / max of a·ŝ + c over ‖ŝ − s‖∞ ≤ ε: a·s + c ∓ ε‖a‖₁ row by row
    def centre(a):
        return s @ a.T if a.dim() == 2 else (a @ s.unsqueeze(-1)).squeeze(-1)
    lower = centre(a_lo) + c_lo - eps * a_lo.abs().sum(-1)
    upper = centre(a_up) + c_up + eps * a_up.abs().sum(-1)
    return lower, upper


@torch.no_grad()
def crown_bounds(net: nn.Sequential, states: torch.Tensor, eps: float, weights=None, biases=None,
                 intersect: bool = True):
    """CROWN: (lower, upper), each (B, out), with lower ≤ μ(ŝ) − μ(s) ≤ upper for every ŝ in
    B∞(s, ε) (float64). ``intersect`` (default) intersects every layer's interval with the one
    propagated from the layer below and the output's with IBP's, so the result is never wider than
    :func:`interval_bounds`; ``intersect=False`` is plain CROWN (with its own intermediate bounds)."""
    eps, ws, bs, relu, s = _prepare(net, states, eps, weights, biases)
    relax = []
    lo = hi = None
    for k in range(len(ws)):
        if k == 0:  # the first layer is linear in ŝ: its box is exact, and IBP's
            zl, zu = _affine_box(ws[0], bs[0], s - eps, s + eps)
        else:
            zl, zu = _backward_bounds(ws, bs, relax, k, s, eps)
            if intersect:  # the box of W_k·σ(previous box) + b_k is sound too
                pl, pu = _affine_box(ws[k], bs[k], lo, hi)
                zl, zu = torch.maximum(zl, pl), torch.minimum(zu, pu)
        if k < len(relu):
            relax.append(relaxation(relu[k], zl, zu))
            lo, hi = _act(zl, relu[k]), _act(zu, relu[k])
    mu = _forward(ws, bs, relu, s)
    return (zl - mu).clamp(max=0), (zu - mu).clamp(min=0)


# -- CROWN-IBP and the SA regulariser's bounds (issue 14, item 2) ---------------------------------
def _crown_ibp_output(ws, bs, relu, s, eps, boxes, tabulated: bool = False):
    """CROWN-IBP (Zhang et al. 2020, ICLR): the hidden layers' intervals are IBP's (``boxes``); only
    the output is bounded by CROWN's back-substitution through the relaxations on those intervals
    (one backward pass from the output, not one per hidden layer as in full CROWN)."""
    relax = [relaxation(relu[j], *boxes[j], tabulated) for j in range(len(relu))]
    return _backward_bounds(ws, bs, relax, len(ws) - 1, s, eps)


@torch.no_grad()
def crown_ibp_bounds(net: nn.Sequential, states: torch.Tensor, eps: float, weights=None, biases=None):
    """CROWN-IBP: (lower, upper), each (B, out), with lower ≤ μ(ŝ) − μ(s) ≤ upper for every ŝ in
    B∞(s, ε) (float64; not intersected with IBP, so not always tighter than it)."""
    eps, ws, bs, relu, s = _prepare(net, states, eps, weights, biases)
    zl, zu = _crown_ibp_output(ws, bs, relu, s, eps, _ibp_boxes(ws, bs, relu, s, eps))
    mu = _forward(ws, bs, relu, s)
    return (zl - mu).clamp(max=0), (zu - mu).clamp(min=0)


def mixed_output_bounds(net: nn.Sequential, states: torch.Tensor, eps: float, beta: float):
    """(lower, upper), each (B, out), with lower ≤ μ(ŝ) ≤ upper for every ŝ in B∞(s, ε): the mix
    β·CROWN-IBP + (1 − β)·IBP of CROWN-IBP training (a convex combination of two sound bounds is
    sound). Unlike the functions above it runs in the network's own dtype (float32 in training) and
    in the autograd graph: the result is differentiable w.r.t. the weights and biases (not the
    states, which are detached). β = 0 skips the CROWN pass. The SA regulariser's
    (``prunerl.sa.kl_upper_bound``); float32 rounding makes it a training objective, not a
    certificate — the certificates are the float64 functions above."""
    beta = float(beta)
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta!r} must lie in [0, 1] (the weight of CROWN-IBP against IBP)")
    eps, ws, bs, relu, s = _prepare(net, states, eps, None, None, differentiable=True)
    boxes = _ibp_boxes(ws, bs, relu, s, eps)
    lower, upper = boxes[-1]
    if beta > 0:
        cl, cu = _crown_ibp_output(ws, bs, relu, s, eps, boxes, tabulated=True)
        lower, upper = beta * cl + (1 - beta) * lower, beta * cu + (1 - beta) * upper
    return lower, upper


# -- certificates ---------------------------------------------------------------------------------
def deviation_bound(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """sqrt(Σ_j max(|l_j|, |u_j|)²): an upper bound on ‖μ(ŝ) − μ(s)‖₂ given l ≤ μ(ŝ) − μ(s) ≤ u."""
    return torch.maximum(lower.abs(), upper.abs()).pow(2).sum(-1).sqrt()


BOUNDS = {"ibp": interval_bounds, "crown": crown_bounds}


def certified_deviation(net: nn.Sequential, states: torch.Tensor, eps: float, method: str = "crown",
                        weights=None, biases=None, chunk: int = 256) -> torch.Tensor:
    """Per state (B,): a certified upper bound on max_{ŝ∈B∞(s,ε)} ‖μ(ŝ) − μ(s)‖₂ (float64), by
    ``method`` (``ibp`` or ``crown``), ``chunk`` states at a time (CROWN's memory grows as
    chunk × width² for the hidden layers beyond the first)."""
    (method,) = check_methods([method], "method")
    parts = [deviation_bound(*BOUNDS[method](net, states[i:i + chunk], eps, weights, biases))
             for i in range(0, states.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.double)


def certified_tv(deviation: torch.Tensor, c: float) -> torch.Tensor:
    """Lemma 1 (App. B, Gaussian with Σ = diag σ²): max_ŝ TV(π(·|s), π(·|ŝ)) ≤ c·Δ(s), c = 1/sqrt(2π σ²_min)
    (``prunerl.lipschitz.gaussian_c``). Not clipped at 1 (TV ≤ 1 trivially), so it stays comparable
    with the global α·c·L̃_∞·ε / α."""
    return c * deviation


def distribution(values: torch.Tensor, threshold: float | None = None) -> dict[str, float]:
    """mean, median, 95th percentile (linear interpolation) and, with ``threshold``, the fraction of
    values ≤ threshold ("certified below" it)."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        return {}
    out = {"mean": float(v.mean()), "median": float(torch.quantile(v, 0.5)), "p95": float(torch.quantile(v, 0.95))}
    if threshold is not None:
        out["frac_below"] = float((v <= threshold).double().mean())
    return out


def check_certificate_settings(methods, threshold, prefix: str = "") -> tuple[tuple[str, ...], float]:
    """The Lipschitz callback's certificate settings (``certificates``, ``certificate_threshold``),
    or a ValueError naming the key, the bad value and what is allowed."""
    if methods is None:
        methods = ()
    if isinstance(methods, str) or not hasattr(methods, "__iter__"):
        raise ValueError(f"{prefix}certificates={methods!r} must be a list of methods from {list(METHODS)} "
                         "([] turns the per-state certificates off)")
    methods = check_methods([str(m) for m in methods], f"{prefix}certificates")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"{prefix}certificate_threshold={threshold!r} is not allowed: a total-variation "
                         "distance, so a number in (0, 1]")
    return methods, float(threshold)
