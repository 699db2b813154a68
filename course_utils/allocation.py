"""How many neurons each layer keeps: ratios, rounded widths, and per-layer allocations.

Pure arithmetic on scores and measured curves (no model is run here):
- ``kept_width`` / ``select_neurons``: a ratio becomes a kept width (optionally a multiple of 64, which
  matrix kernels like) and the highest-scoring neurons are kept;
- ``allocate_ratios``: per-layer ratios from one sensitivity number per layer (a power-law damage model);
- ``allocate_from_curves``: per-layer ratios from measured damage curves (``sensitivity.damage_curves``),
  the exact optimum of a fractional knapsack over each curve's lower convex hull.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

import torch

CURVE_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75)  # probe ratios of a damage curve


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` if it is a number in [0, 1), else raise a ``ValueError`` that says so."""
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1); got {ratio!r}")
    return float(ratio)


def check_multiple_of(multiple_of: int) -> int:
    """Return ``multiple_of`` if it is an int >= 1 (widths are rounded to multiples of it), else raise."""
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int >= 1; got {multiple_of!r}")
    return multiple_of


def kept_width(width: int, ratio: float, multiple_of: int = 1) -> int:
    """Neurons left after removing ``ratio`` of ``width``, rounded to a multiple of ``multiple_of``, in [1, width]."""
    rounded = math.floor(width * (1 - ratio) / multiple_of + 0.5) * multiple_of
    return min(width, max(rounded, multiple_of))


def width_for_budget(width: int, params: float, n_layers: int, per_neuron: int, multiple_of: int = 1) -> int:
    """The uniform MLP width that removes about ``params`` parameters over ``n_layers`` layers whose neurons own
    ``per_neuron`` parameters each (``anatomy.neuron_parameters``), rounded to ``multiple_of``, in [multiple_of, width].

    Lesson 12 uses it to meet one parameter budget by width instead of by whole layers."""
    check_multiple_of(multiple_of)
    if params < 0 or n_layers < 1 or per_neuron < 1:
        raise ValueError(f"need params >= 0, n_layers >= 1 and per_neuron >= 1; got {params}, {n_layers}, {per_neuron}")
    neurons = params / (n_layers * per_neuron)
    return min(width, max(multiple_of, int(round((width - neurons) / multiple_of) * multiple_of)))


def select_neurons(scores: dict[int, torch.Tensor], ratio: float | dict[int, float], protect: Iterable[int] = (),
                   multiple_of: int = 1) -> dict[int, torch.Tensor]:
    """Sorted indices of the highest-scoring neurons to keep in each layer; protected layers keep all.

    ``ratio`` is one fraction for every layer, or a dict of per-layer fractions (``allocate_ratios``).
    """
    ratios = per_layer_ratios(ratio, scores)
    multiple_of = check_multiple_of(multiple_of)
    protect = set(protect)
    unknown = protect - set(scores)
    if unknown:
        raise ValueError(f"protected layers {sorted(unknown)} have no scores; scored layers: {sorted(scores)}")
    keep = {}
    for index, layer_scores in scores.items():
        width = layer_scores.shape[0]
        n_keep = width if index in protect else kept_width(width, ratios[index], multiple_of)
        order = torch.argsort(layer_scores.detach().cpu(), descending=True, stable=True)  # ties: lower index first
        keep[index] = order[:n_keep].sort().values
    return keep


def per_layer_ratios(ratio: float | dict[int, float], layers: Iterable[int]) -> dict[int, float]:
    """One checked ratio per layer from a single ratio or a {layer: ratio} dict covering every layer."""
    layers = list(layers)
    if isinstance(ratio, dict):
        missing = set(layers) - set(ratio)
        if missing:
            raise ValueError(f"per-layer ratios are missing layers {sorted(missing)}")
        return {i: check_ratio(ratio[i]) for i in layers}
    ratio = check_ratio(ratio)
    return {i: ratio for i in layers}


def allocate_ratios(sensitivity: torch.Tensor, ratio: float, power: float = 2.0, max_ratio: float = 0.85,
                    protect: Iterable[int] = ()) -> dict[int, float]:
    """Per-layer ratios with mean ``ratio`` that spare the sensitive layers.

    Models the damage of removing a fraction r of layer l as s_l * r^power (s_l = measured
    sensitivity); minimising the total damage at a fixed mean ratio gives r_l proportional to
    s_l^(-1 / (power - 1)), capped at ``max_ratio``. Protected layers get 0.
    """
    ratio = check_ratio(ratio)
    if power <= 1:
        raise ValueError(f"power must be > 1 (damage grows faster than linearly); got {power}")
    protect = set(protect)
    n = len(sensitivity)
    free = [i for i in range(n) if i not in protect]
    if not free or ratio * n > max_ratio * len(free) + 1e-9:
        raise ValueError(f"cannot remove a mean {ratio:.0%} of neurons with {len(free)} of {n} layers "
                         f"prunable at most {max_ratio:.0%} each")
    sensitivity = sensitivity.double()
    floor = 0.05 * sensitivity.clamp_min(0).median().clamp_min(1e-12)  # a probe reading ~0 is noise, not "free"
    weight = sensitivity.clamp_min(floor) ** (-1.0 / (power - 1))
    weight[list(protect)] = 0.0
    low, high = 0.0, max_ratio / weight[weight > 0].min().item()  # at ``high`` every free layer is at the cap
    for _ in range(200):  # bisection on the scale so the mean ratio matches
        scale = (low + high) / 2
        if (scale * weight).clamp(max=max_ratio).mean() < ratio:
            low = scale
        else:
            high = scale
    ratios = (high * weight).clamp(max=max_ratio)
    return {i: float(r) for i, r in enumerate(ratios)}


def allocate_from_curves(damage: torch.Tensor, ratio: float, grid: Iterable[float] = CURVE_GRID,
                         max_ratio: float = 0.85, protect: Iterable[int] = ()) -> dict[int, float]:
    """Per-layer ratios with mean ``ratio`` that minimise the total of the measured damage curves.

    Each layer's curve (``damage[l]`` at the ``grid`` ratios, 0 at ratio 0) is replaced by its lower convex
    hull; the hull segments of all layers are then taken cheapest first (damage per unit of ratio) until
    the mean ratio is reached, the last one partly. For convex piecewise-linear curves this is the exact
    minimum of sum_l D_l(r_l) at mean r = ``ratio`` (a fractional knapsack), assuming the layers' damages add
    up. Layers in ``protect`` keep every neuron; no layer goes past ``max_ratio`` or the last grid ratio.
    """
    ratio = check_ratio(ratio)
    grid = [float(g) for g in grid]
    if damage.ndim != 2 or damage.shape[1] != len(grid):
        raise ValueError(f"damage must be (layers, {len(grid)}) to match grid; got {tuple(damage.shape)}")
    protect = set(protect)
    n = damage.shape[0]
    if any(not isinstance(i, int) or not 0 <= i < n for i in protect):
        raise ValueError(f"protect must list layer indices in [0, {n}); got {sorted(protect, key=str)}")
    segments = []  # (damage per unit ratio, layer, length)
    for index in range(n):
        if index in protect:
            continue
        hull = [(0.0, 0.0)]
        points = [(g, float(d)) for g, d in zip(grid, damage[index].tolist(), strict=True) if g <= max_ratio + 1e-9]
        for point in points:
            while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0])
                                      >= (point[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to point
            hull.append(point)
        segments += [((y1 - y0) / (x1 - x0), index, x1 - x0) for (x0, y0), (x1, y1)
                     in zip(hull, hull[1:], strict=False)]
    budget = ratio * n
    if sum(length for *_, length in segments) < budget - 1e-9:
        raise ValueError(f"cannot remove a mean {ratio:.0%} of neurons: the unprotected layers' curves reach "
                         f"{min(max_ratio, grid[-1]):.0%} at most; extend grid or protect fewer layers")
    ratios = [0.0] * n
    for _cost, index, length in sorted(segments):
        take = min(length, budget)
        ratios[index] += take
        budget -= take
        if budget <= 1e-12:
            break
    return {i: float(r) for i, r in enumerate(ratios)}




def check_grid(grid: Iterable[float]) -> list[float]:
    """Probe ratios of a damage curve: increasing, each in (0, 1)."""
    grid = [check_ratio(g) for g in grid]
    if not grid or any(b <= a for a, b in zip(grid, grid[1:], strict=False)) or grid[0] <= 0:
        raise ValueError(f"grid must be increasing ratios in (0, 1); got {grid}")
    return grid
