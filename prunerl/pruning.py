"""Pruning maths (Sec. 4.4, Alg. 1 lines 9–11): the cubic schedule, ERK allocation, criteria scores
and mask computation. No Lightning, no Hydra: ``callbacks/pruning.py`` drives these from the
training loop, the tests call them directly.

Masks are boolean tensors (True = kept) over the weight matrices of ``nn.Linear`` layers; the
elementwise criteria never prune biases. Structured ``neuron`` pruning removes whole hidden units
(:func:`neuron_masks`): a unit's row of W_ℓ, its bias entry b_ℓ[j] and its column of W_ℓ₊₁, so it
also masks the hidden layers' biases. Either way pruning zeroes entries, so Thm. 1 applies:
zeroing entries can only lower every layer's surrogate norm
(``prunerl.lipschitz.lipschitz_surrogate``).
"""

from __future__ import annotations

import math

import torch

CRITERIA = ("none", "random", "magnitude", "magnitude_ste", "saliency", "neuron")
STRUCTURED = ("neuron",)  # criteria that remove whole hidden units (allocation: evenly over the hidden layers)
ALLOCATIONS = ("global", "layer", "erk")
SCOPES = ("actor", "critic", "both")


def cubic_sparsity(t: int, t_start: int, t_end: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i − s_f)(1 − (t − t_start)/(t_end − t_start))³ on
    [t_start, t_end]; s_i before, s_f after."""
    if t <= t_start:
        return initial
    if t >= t_end:
        return final
    frac = (t - t_start) / (t_end - t_start)
    return final + (initial - final) * (1.0 - frac) ** 3


def schedule_bounds(total_updates: int, burn_in: float, end: float) -> tuple[int, int]:
    """(t_start, t_end) in updates: pruning starts once t/T > β (Alg. 1 line 9) and the cubic ramp
    reaches its final sparsity at t_end = ⌈end·T⌉ (at least one update after t_start)."""
    t_start = math.floor(burn_in * total_updates)
    t_end = max(t_start + 1, math.ceil(end * total_updates))
    return t_start, t_end


def is_mask_update(t: int, t_start: int, t_end: int, interval: int) -> bool:
    """Mask updates: every ``interval`` updates after t_start up to t_end, and at t_end itself
    (micro-pruning); ``interval == 0`` is one-shot: a single update at t_start + 1."""
    if interval == 0:
        return t == t_start + 1
    return t_start < t <= t_end and ((t - t_start) % interval == 0 or t == t_end)


def scheduled_sparsity(t: int, t_start: int, t_end: int, final: float, interval: int) -> float:
    """The target sparsity the mask update at t prunes to (one-shot jumps straight to ``final``)."""
    return final if interval == 0 else cubic_sparsity(t, t_start, t_end, final)


def erk_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    """Erdős–Rényi(-Kernel) allocation (Evci et al. 2020, RigL) for Linear weights (out, in):
    density_ℓ ∝ (n_in + n_out)/(n_in·n_out), scaled so that Σ density_ℓ·N_ℓ = density·Σ N_ℓ;
    a layer that would exceed density 1 is kept dense and the rest are rescaled."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density} is outside [0, 1]")
    sizes = [o * i for o, i in shapes]
    raw = [(o + i) / (o * i) for o, i in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[j] for j in dense)
        denom = sum(raw[j] * sizes[j] for j in range(len(shapes)) if j not in dense)
        if denom == 0:
            return [1.0] * len(shapes)
        scale = budget / denom
        over = [j for j in range(len(shapes)) if j not in dense and raw[j] * scale > 1.0]
        if not over:
            return [1.0 if j in dense else raw[j] * scale for j in range(len(shapes))]
        dense.add(max(over, key=lambda j: raw[j]))  # the densest first, as RigL does


def _apportion(total: int, shares: list[float], caps: list[int], floors: list[int] | None = None) -> list[int]:
    """Integers in [floors, caps] summing to ``total`` (Σ floors ≤ total ≤ Σ caps), proportional to
    ``shares`` (largest remainder). With ``floors`` (what each layer has already pruned) a layer
    whose share rounds below its floor keeps its floor and the others give the difference back,
    smallest remainder first, so the total stays exact."""
    floors = floors or [0] * len(shares)
    if not sum(floors) <= total <= sum(caps):
        raise ValueError(f"cannot split {total} pruned weights over layers of sizes {caps} "
                         f"that have already pruned {floors}")
    exact = [min(max(s, f), c) for s, f, c in zip(shares, floors, caps)]
    counts = [max(math.floor(x), f) for x, f in zip(exact, floors)]
    order = sorted(range(len(shares)), key=lambda j: exact[j] - counts[j], reverse=True)
    short = total - sum(counts)
    while short > 0:
        for j in order:
            if short > 0 and counts[j] < caps[j]:
                counts[j] += 1
                short -= 1
    for j in reversed(order):  # only where floors pushed the sum over the total
        while short < 0 and counts[j] > floors[j]:
            counts[j] -= 1
            short += 1
    return counts


def layer_prune_counts(shapes: list[tuple[int, int]], sparsity: float, allocation: str,
                       at_least: list[int] | None = None) -> list[int]:
    """How many weights each layer loses at ``sparsity`` under ``layer`` or ``erk`` allocation.
    The counts add up to round(sparsity · Σ N_ℓ) exactly — also with ``at_least`` (each layer's
    already-pruned count, which a nested mask cannot go below: the rounding of the shares is not
    monotone in the sparsity, so a layer's own count can dip by one as the target rises)."""
    sizes = [o * i for o, i in shapes]
    total = round(sparsity * sum(sizes))
    if allocation == "layer":
        shares = [sparsity * n for n in sizes]
    elif allocation == "erk":
        shares = [(1.0 - d) * n for d, n in zip(erk_densities(shapes, 1.0 - sparsity), sizes)]
    else:
        raise ValueError(f"allocation={allocation!r} has no per-layer counts; allowed: ['erk', 'layer']")
    if at_least is not None:
        total = max(total, sum(at_least))
    return _apportion(total, shares, sizes, at_least)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k lowest scores; ties at the threshold go to the earliest
    positions, so the result is deterministic. (kthvalue: ~8× cheaper than a full argsort.)"""
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    v = torch.kthvalue(flat, k).values
    out = flat < v
    need = k - int(out.sum())
    if need > 0:
        out[torch.nonzero(flat == v).flatten()[:need]] = True
    return out.view_as(scores)


def compute_masks(scores: dict[str, torch.Tensor], sparsity: float, allocation: str,
                  previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the lowest-scoring weights to ``sparsity`` of the layers in ``scores``.

    ``allocation``: ``global`` ranks all the layers' scores together; ``layer`` prunes each layer
    to ``sparsity``; ``erk`` prunes each layer to its ERK share. Exactly round(sparsity · Σ N_ℓ)
    weights are pruned in all (or what ``previous`` already pruned, if more). With ``previous``
    masks, pruned weights stay pruned (their scores count as −∞ and no layer prunes fewer than
    before), so successive masks only ever remove weights — elementwise pruning, as Thm. 1
    assumes. Without ``previous`` (magnitude-STE) a weight may come back.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not allowed; allowed: {list(ALLOCATIONS)}")
    names = list(scores)
    s = {}
    for n in names:
        sc = scores[n].detach().float()
        if previous is not None:
            sc = sc.masked_fill(~previous[n], -math.inf)
        s[n] = sc
    if allocation == "global":
        flat = torch.cat([s[n].flatten() for n in names])
        k = round(sparsity * flat.numel())
        if previous is not None:
            k = max(k, sum(int((~previous[n]).sum()) for n in names))
        pruned = _lowest(flat, k)
        out, i = {}, 0
        for n in names:
            m = s[n].numel()
            out[n] = ~pruned[i:i + m].view_as(s[n])
            i += m
        return out
    already = [int((~previous[n]).sum()) for n in names] if previous is not None else None
    counts = layer_prune_counts([tuple(s[n].shape) for n in names], sparsity, allocation, already)
    return {n: ~_lowest(s[n], k) for n, k in zip(names, counts)}


def magnitude_scores(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w| (magnitude and magnitude-STE)."""
    return {n: w.detach().abs() for n, w in weights.items()}


def saliency_scores(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """First-order Taylor score |w · ∂L/∂w| (the loss change if w were removed, to first order)."""
    return {n: (w.detach() * grads[n]).abs() for n, w in weights.items()}


def random_scores(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Fixed uniform scores from a private generator (the global torch RNG samples actions and
    is checkpointed for exact resume — pruning must not consume it)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(shape, generator=g) for n, shape in shapes.items()}


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of pruned entries over all the masks together."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0


# -- structured (neuron) pruning -----------------------------------------------------------------
# A hidden unit j of layer ℓ (ℓ = 0 … L−2 of an MLP with Linear layers W_0 … W_{L−1}) owns row j of
# W_ℓ, bias entry b_ℓ[j] and column j of W_ℓ₊₁. Removing it zeroes all three: with its outgoing
# column zero the unit's output — the constant σ(b_ℓ[j]) included — no longer reaches the network's
# output, and its bias is zeroed too so that the pruned module holds exactly the smaller network
# (``prunerl.export`` drops such units physically).
#
# The target is counted in weights, as for the elementwise criteria: ``sparsity`` is the fraction
# of the network's weight-matrix entries that are zero. Units are removed evenly across the hidden
# layers (each loses the same fraction of its units, as nearly as whole units allow: the next unit
# comes from the layer with the smallest removed fraction, the earlier layer on a tie) until the
# zeroed weights are as close to round(sparsity·N) as whole units allow — within half the weights
# of one unit. Within a layer the units with the lowest score go first:
# ‖W_ℓ[j,:]‖₂ · ‖W_ℓ₊₁[:,j]‖₂ (incoming × outgoing), a bound on how much the unit's pre-activation
# can vary times how strongly its output reaches the next layer. Every hidden layer keeps at least
# one unit.


def neuron_scores(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per hidden unit of each hidden layer: ‖W_ℓ[j,:]‖₂ · ‖W_ℓ₊₁[:,j]‖₂ (``weights``: the Linear
    weights (out, in) of one MLP, in order)."""
    return [w.detach().float().norm(dim=1) * nxt.detach().float().norm(dim=0)
            for w, nxt in zip(weights[:-1], weights[1:])]


def unit_weight_masks(weights: list[torch.Tensor], units: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keep-masks of the weight matrices given keep-vectors of the hidden units: entry (i, j) of
    W_ℓ is kept iff output unit i of layer ℓ and input unit j are both kept (inputs and outputs
    always are)."""
    out = []
    for ell, w in enumerate(weights):
        rows = units[ell] if ell < len(units) else torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        cols = units[ell - 1] if ell > 0 else torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        out.append(rows[:, None] & cols[None, :])
    return out


def zeroed_by_units(shapes: list[tuple[int, int]], removed: list[int]) -> int:
    """Weight entries zeroed when ``removed[ℓ]`` units of each hidden layer are gone."""
    total = alive = 0
    for ell, (o, i) in enumerate(shapes):
        rows = o - removed[ell] if ell < len(removed) else o
        cols = i - removed[ell - 1] if ell > 0 else i
        total += o * i
        alive += rows * cols
    return total - alive


def neuron_counts(shapes: list[tuple[int, int]], sparsity: float, at_least: list[int] | None = None) -> list[int]:
    """How many units each hidden layer loses at ``sparsity`` (a fraction of weights; see the
    block comment above): units are added evenly across layers, starting from ``at_least`` (what
    each layer already removed: masks stay nested), and the count whose zeroed weights are nearest
    round(sparsity·N) wins (the smaller one on a tie)."""
    hidden = [o for o, _ in shapes[:-1]]
    target = round(sparsity * sum(o * i for o, i in shapes))
    counts = list(at_least) if at_least is not None else [0] * len(hidden)
    while True:
        open_ = [j for j in range(len(hidden)) if counts[j] < hidden[j] - 1]
        if not open_:
            return counts
        j = min(open_, key=lambda k: (counts[k] / hidden[k], k))
        nxt = counts[:j] + [counts[j] + 1] + counts[j + 1:]
        if abs(zeroed_by_units(shapes, nxt) - target) >= abs(zeroed_by_units(shapes, counts) - target):
            return counts
        counts = nxt


def neuron_masks(weights: list[torch.Tensor], sparsity: float,
                 previous: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weight keep-masks, unit keep-vectors of the hidden layers) removing whole hidden units of
    one MLP (``weights``: its Linear weights (out, in), in order) to ``sparsity`` of its weights.
    With ``previous`` unit keep-vectors, removed units stay removed (nested masks)."""
    if len(weights) < 2:
        raise ValueError("neuron pruning needs an MLP with at least one hidden layer")
    shapes = [tuple(w.shape) for w in weights]
    scores = neuron_scores(weights)
    if previous is not None:
        scores = [s.masked_fill(~p.to(s.device), -math.inf) for s, p in zip(scores, previous)]
    already = [int((~p).sum()) for p in previous] if previous is not None else None
    counts = neuron_counts(shapes, sparsity, already)
    units = [~_lowest(s, k) for s, k in zip(scores, counts)]
    return unit_weight_masks(weights, units), units


def unit_tolerance(shapes: list[tuple[int, int]]) -> int:
    """How far (in weights) a neuron mask may miss round(sparsity·N): half the weights of the
    largest unit (its fan-in plus its fan-out)."""
    return max(i + nxt[0] for (_, i), nxt in zip(shapes[:-1], shapes[1:])) // 2
