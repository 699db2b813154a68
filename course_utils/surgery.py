"""Width pruning surgery: choose which MLP neurons to keep, then cut them out of the model for real.

Removing neuron ``j`` deletes its input weights (GPT-2: column ``j`` of ``c_fc`` and its bias;
Llama family: row ``j`` of ``gate_proj`` and ``up_proj`` and their biases) and its output weights
(GPT-2: row ``j`` of ``c_proj``; Llama: column ``j`` of ``down_proj``). The sliced projections are
new, smaller modules, so the model gets faster and smaller, not just sparser (LLM-Pruner, Ma et al.
2023; FLAP, An et al. 2024).

Every public function validates all of its inputs before touching the model: when it raises, the
model is exactly as it was.

Config: when every layer ends up with the same width, the family's width key (``n_inner`` /
``intermediate_size``) is updated and ``save_pretrained`` + ``from_pretrained`` just work. When
widths differ (protected layers), ``config.intermediate_sizes`` holds the per-layer list and the
width key holds the largest; ``from_pretrained`` cannot build such a model, it needs a custom loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import arch, evaluation, hooks, importance
from .models import count_parameters


@dataclass
class PruneReport:
    """What ``prune_mlp`` did."""

    method: str  # importance method used to rank neurons
    ratio: float  # fraction of neurons removed in each unprotected layer
    params_before: int
    params_after: int
    kept_width: dict[int, int] = field(default_factory=dict)  # layer index -> MLP width after pruning

    def __str__(self) -> str:
        removed = 1 - self.params_after / self.params_before
        widths = set(self.kept_width.values())
        shown = f"width {widths.pop()} in every layer" if len(widths) == 1 else f"widths {self.kept_width}"
        return (f"prune_mlp({self.method}, ratio={self.ratio}): {self.params_before / 1e6:.2f} M -> "
                f"{self.params_after / 1e6:.2f} M parameters (-{100 * removed:.1f} %); {shown}")


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` if it is a number in [0, 1), else raise a ``ValueError`` that says so."""
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1); got {ratio!r}")
    return float(ratio)


def _check_multiple_of(multiple_of: int) -> int:
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int >= 1; got {multiple_of!r}")
    return multiple_of


def kept_width(width: int, ratio: float, multiple_of: int = 1) -> int:
    """Neurons left after removing ``ratio`` of ``width``, rounded to a multiple of ``multiple_of``, in [1, width]."""
    rounded = math.floor(width * (1 - ratio) / multiple_of + 0.5) * multiple_of
    return min(width, max(rounded, multiple_of))


def select_neurons(scores: dict[int, torch.Tensor], ratio: float | dict[int, float], protect: Iterable[int] = (),
                   multiple_of: int = 1) -> dict[int, torch.Tensor]:
    """Sorted indices of the highest-scoring neurons to keep in each layer; protected layers keep all.

    ``ratio`` is one fraction for every layer, or a dict of per-layer fractions (``allocate_ratios``).
    """
    ratios = _per_layer_ratios(ratio, scores)
    multiple_of = _check_multiple_of(multiple_of)
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


def _per_layer_ratios(ratio: float | dict[int, float], layers: Iterable[int]) -> dict[int, float]:
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


CURVE_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75)


def damage_curves(model: nn.Module, stats: dict[int, hooks.TokenStats], calibration: list[dict],
                  grid: Iterable[float] = CURVE_GRID, refit: bool = True, method: str = "wanda_like") -> torch.Tensor:
    """(layers, len(grid)) loss increases: ``layer_sensitivity`` at every probe ratio of ``grid``.

    Row l is layer l's measured damage curve: what removing each fraction of its neurons alone costs on
    ``calibration`` (use batches kept apart from the ones ``stats`` came from). ``allocate_from_curves`` turns
    the curves into per-layer ratios. Cost: len(grid) x layers loss evaluations on ``calibration``, each
    starting at the probed layer (the hidden states entering it are computed once), so about half as many
    layer passes as len(grid) x layers full forward passes.
    """
    grid = [check_ratio(g) for g in grid]
    if not grid or any(b <= a for a, b in zip(grid, grid[1:], strict=False)) or grid[0] <= 0:
        raise ValueError(f"grid must be increasing ratios in (0, 1); got {grid}")
    return _probe_damage(model, stats, calibration, grid, method, refit)


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


def layer_sensitivity(model: nn.Module, stats: dict[int, hooks.TokenStats], calibration: list[dict],
                      probe_ratio: float = 0.5, method: str = "wanda_like", refit: bool = False) -> torch.Tensor:
    """Loss increase (nats/token on ``calibration``) when each layer alone loses ``probe_ratio`` of its neurons.

    The probe silences the lowest-``method`` neurons with a temporary hook (no copy, no surgery),
    replacing them by their mean activation; the model is unchanged afterwards. With ``refit`` (needs
    Gram matrices in ``stats``) the probe instead lets the kept neurons compensate (``refit_output``), so
    it measures what a layer costs a refitted model: the right yardstick for refit and OBS pruning.
    """
    return _probe_damage(model, stats, calibration, [check_ratio(probe_ratio)], method, refit)[:, 0]


@torch.no_grad()
def _loss_from(model: nn.Module, index: int, stream: list[torch.Tensor], arguments: list[dict],
               calibration: list[dict]) -> float:
    """``evaluation.calibration_loss`` computed from the hidden states entering decoder layer ``index``."""
    norm = arch.get_module(model, arch.get_spec(model).final_norm)
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for hidden, kwargs, batch in zip(stream, arguments, calibration, strict=True):
        for layer in arch.decoder_layers(model)[index:]:
            hidden = _hidden_out(layer(hidden, **kwargs))
        loss, tokens = evaluation.next_token_loss(head(norm(hidden)), batch)
        total, count = total + loss, count + tokens
    return total / count


@torch.no_grad()
def _probe_damage(model: nn.Module, stats: dict[int, hooks.TokenStats], calibration: list[dict],
                  ratios: list[float], method: str, refit: bool) -> torch.Tensor:
    """(layers, len(ratios)) loss increases: layer l alone losing each ratio of its neurons (see ``layer_sensitivity``).

    The hidden states entering layer l are carried from layer to layer, so each probe runs layers l.. only.
    """
    importance.require_batches(calibration, "layer_sensitivity")
    if any("attention_mask" not in batch for batch in calibration):
        raise ValueError("calibration batches need an attention_mask (data.calibration_batches(...) gives one)")
    if refit:
        _check_refit(model, {i: None for i in range(arch.num_layers(model))}, stats)
    device = next(model.parameters()).device
    captured = layer_inputs(model, calibration)
    stream, arguments = [hidden for hidden, _ in captured], [kwargs for _, kwargs in captured]
    base = _loss_from(model, 0, stream, arguments, calibration)
    result = torch.zeros(arch.num_layers(model), len(ratios))
    for index, layer in enumerate(arch.decoder_layers(model)):
        order = importance.score_layer(model, index, method, stats.get(index)).argsort()
        output = arch.mlp_parts(model, index).output
        for column, ratio in enumerate(ratios):
            n_drop = order.numel() - kept_width(order.numel(), ratio)
            if refit:
                keep = order[n_drop:].sort().values
                weight, bias = refit_output(_linear_layout(output), output.bias, stats[index], keep)
                keep, weight, bias = keep.to(device), weight.to(device), bias.to(device)

                def compensate(module, args, out, keep=keep, weight=weight, bias=bias):
                    return args[0][..., keep] @ weight.T.to(out.dtype) + bias.to(out.dtype)

                handle = output.register_forward_hook(compensate)
            else:
                dropped, mean = order[:n_drop].to(device), stats[index].mean.to(device)

                def silence(module, args, dropped=dropped, mean=mean):
                    x = args[0].clone()
                    x[..., dropped] = mean[dropped].to(x.dtype)
                    return (x,)

                handle = output.register_forward_pre_hook(silence)
            try:
                result[index, column] = _loss_from(model, index, stream, arguments, calibration) - base
            finally:
                handle.remove()
        stream = [_hidden_out(layer(h, **kw)) for h, kw in zip(stream, arguments, strict=True)]
    return result


def obs_keep(model: nn.Module, index: int, stats: hooks.TokenStats, n_keep: int, chunk: int = 32,
             ridge: float = 1e-3) -> torch.Tensor:
    """Neurons to keep in one layer by Optimal Brain Surgeon removal of output-projection columns.

    Repeatedly removes the ``chunk`` neurons whose loss of output, ||w_j||^2 / [H^-1]_jj with H the
    (ridge-damped) second moment of the activations plus a bias column, is smallest, updating the
    remaining weights and H^-1 exactly after each removal (Hassibi & Stork 1993; structured, as in
    ZipLM, Kurtic et al. 2023). The kept set pairs with ``refit_output``, which gives the same weights.
    """
    parts = arch.mlp_parts(model, index)
    width = parts.width
    if stats is None or stats.gram is None or stats.gram.shape != (width, width):
        raise ValueError(f"OBS selection needs activation statistics with a Gram matrix for layer {index} "
                         "(hooks.capture_mlp_activations(model, gram=True))")
    moment, mean = stats.second_moment.double().cpu(), (stats.sum / stats.count).double().cpu()  # stats may be on GPU
    hessian = torch.empty(width + 1, width + 1, dtype=torch.float64)  # features: (activations, 1)
    hessian[:width, :width] = moment + ridge * moment.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    hessian[:width, width] = hessian[width, :width] = mean
    hessian[width, width] = 1.0
    inverse = torch.linalg.inv(hessian)
    out = parts.output
    bias = out.bias.detach().double().cpu() if out.bias is not None else torch.zeros(_linear_layout(out).shape[0],
                                                                                   dtype=torch.float64)
    weight = torch.cat([_linear_layout(out).double().cpu(), bias[:, None]], dim=1)  # (hidden, width + 1), CPU
    return _obs_remove(weight, inverse, width, n_keep, chunk)


def _obs_remove(weight: torch.Tensor, inverse: torch.Tensor, width: int, n_keep: int, chunk: int) -> torch.Tensor:
    """The OBS loop: drop the ``chunk`` cheapest of the first ``width`` columns at a time until ``n_keep`` remain.

    ``weight`` (out, width + 1) and ``inverse`` (width + 1, width + 1, the inverse Hessian) are updated in place;
    the last column (the bias feature) is never removed. Returns the kept indices, sorted.
    """
    alive = torch.ones(width, dtype=torch.bool)
    while int(alive.sum()) > n_keep:
        candidates = alive.nonzero().squeeze(1)
        loss = weight[:, candidates].pow(2).sum(0) / inverse.diagonal()[candidates]
        drop = candidates[loss.topk(min(chunk, candidates.numel() - n_keep), largest=False).indices]
        block = torch.linalg.inv(inverse[drop][:, drop])  # (q, q)
        weight -= weight[:, drop] @ block @ inverse[drop, :]
        inverse -= inverse[:, drop] @ block @ inverse[drop, :]
        alive[drop] = False
    return alive.nonzero().squeeze(1)


def _check_keep(model: nn.Module, keep_by_layer: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Validate indices for every layer (range, duplicates, empty) and return them as sorted LongTensors."""
    checked = {}
    for index, keep in keep_by_layer.items():
        arch.check_layer_index(model, index)
        parts = arch.mlp_parts(model, index)
        for module in (*parts.inputs, parts.output):
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise ValueError(f"layer {index}: cannot slice a {type(module).__name__}; "
                                 "only nn.Linear and transformers Conv1D projections are supported")
        keep = torch.as_tensor(keep).detach().cpu()
        if keep.ndim != 1 or keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
            raise ValueError(f"layer {index}: keep indices must be a 1-D integer tensor; got {keep.dtype} "
                             f"of shape {tuple(keep.shape)}")
        if keep.numel() == 0:
            raise ValueError(f"layer {index}: keep indices are empty; an MLP needs at least one neuron")
        if keep.min() < 0 or keep.max() >= parts.width:
            raise ValueError(f"layer {index}: keep indices must be in [0, {parts.width - 1}]; "
                             f"got min {keep.min().item()}, max {keep.max().item()}")
        if keep.unique().numel() != keep.numel():
            raise ValueError(f"layer {index}: keep indices contain duplicates")
        checked[index] = keep.long().sort().values
    return checked


def _sliced(module: nn.Module, keep: torch.Tensor, neurons_out: bool) -> nn.Module:
    """A new projection holding only the ``keep`` neurons: its outputs if ``neurons_out``, else its inputs."""
    weight, bias = module.weight.detach(), module.bias
    keep = keep.to(weight.device)
    if isinstance(module, nn.Linear):  # weight (out, in)
        weight = weight[keep] if neurons_out else weight[:, keep]
        with torch.device("meta"):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:  # Conv1D: weight (in, out)
        weight = weight[:, keep] if neurons_out else weight[keep]
        with torch.device("meta"):
            new = Conv1D(weight.shape[1], weight.shape[0])  # Conv1D(nf=out, nx=in)
    new.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        bias = bias.detach()[keep] if neurons_out else bias.detach()
        new.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def _update_config(model: nn.Module) -> None:
    """Write the MLP widths into the config: one width key, or a per-layer list when they differ."""
    spec = arch.get_spec(model)
    widths = [arch.mlp_parts(model, i).width for i in range(arch.num_layers(model))]
    setattr(model.config, spec.intermediate_key, max(widths))
    if len(set(widths)) == 1:
        if hasattr(model.config, "intermediate_sizes"):
            del model.config.intermediate_sizes
    else:
        model.config.intermediate_sizes = widths  # from_pretrained ignores this: needs a custom loader


def refit_output(weight: torch.Tensor, bias: torch.Tensor | None, stats: hooks.TokenStats, keep: torch.Tensor,
                 ridge: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares refit of an MLP's output projection after keeping only the ``keep`` neurons.

    Minimises E|| W a + b - (W' a_keep + c) ||^2 + ridge * s * ||W' - W_keep||^2 over the calibration
    tokens (s = mean of E[a_i^2], so ``ridge`` is scale-free), in closed form from the second moments
    E[a a^T] and E[a]: the kept neurons absorb what the removed ones used to write, and the bias ``c``
    absorbs their mean (FLAP's bias compensation is the special case W' = W_keep). The ridge term pulls
    W' towards the plain slice, so a large ``ridge`` means "no refit" and a small one trusts the data.
    ``weight`` is (hidden, width) (``nn.Linear`` layout); returns W' (hidden, k) and c (hidden,), float32.
    """
    moment = stats.second_moment.double().cpu()  # (width, width); stats may live on the GPU
    mean = (stats.sum / stats.count).double().cpu()  # (width,)
    k = keep.numel()
    weight = weight.double().cpu()
    lhs = torch.empty(k + 1, k + 1, dtype=torch.float64)  # E[x x^T] with x = (a_keep, 1)
    lhs[:k, :k] = moment[keep][:, keep]
    lhs[:k, k] = lhs[k, :k] = mean[keep]
    lhs[k, k] = 1.0
    cross = torch.cat([moment[:, keep], mean[:, None]], dim=1)  # E[a x^T]: (width, k + 1)
    new_weight, new_bias = _ridge_refit(lhs, (weight @ cross).T, weight[:, keep], ridge)
    return new_weight, new_bias + (bias.double().cpu().float() if bias is not None else 0.0)


def _ridge_refit(lhs: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor,
                 ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min E||t - (W' a + c)||^2 + ridge * s * ||W' - prior||^2 from moments of x = (a, 1).

    ``lhs`` = E[x x^T] (k + 1, k + 1), ``rhs`` = E[x t^T] (k + 1, out), ``prior`` (out, k); s is the mean of
    E[a_i^2]. Returns W' (out, k) and c (out,), float32.
    """
    k = prior.shape[1]
    lhs = lhs.clone()
    damping = ridge * lhs.diagonal()[:k].mean()
    lhs[:k, :k] += damping * torch.eye(k, dtype=torch.float64)
    rhs = rhs.clone()
    rhs[:k] += damping * prior.T.double()  # prior: the kept columns as they were
    solution = torch.linalg.solve(lhs, rhs)  # (k + 1, out)
    return solution[:k].T.float(), solution[k].float()


def _linear_layout(module: nn.Module) -> torch.Tensor:
    """An output projection's weight as (out, in), whatever its storage (Conv1D stores (in, out))."""
    return module.weight.detach() if isinstance(module, nn.Linear) else module.weight.detach().T


def _write_output(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a (hidden, width) weight and a (hidden,) bias into an output projection, whatever its layout."""
    weight = weight if isinstance(module, nn.Linear) else weight.T  # Conv1D stores (in, out)
    module.weight.data.copy_(weight.to(module.weight.dtype))
    module.bias.data.copy_(bias.to(module.bias.dtype))


def _enable_mlp_bias(model: nn.Module) -> None:
    """Give every MLP projection a (zero) bias and set the config flag, so the model reloads unchanged."""
    spec = arch.get_spec(model)
    if spec.mlp_bias_key is None or getattr(model.config, spec.mlp_bias_key, False):
        return
    for index in range(arch.num_layers(model)):
        parts = arch.mlp_parts(model, index)
        for module in [*parts.inputs, parts.output]:
            if module.bias is None:
                out_features = _linear_layout(module).shape[0]
                module.bias = nn.Parameter(torch.zeros(out_features, dtype=module.weight.dtype,
                                                       device=module.weight.device))
    setattr(model.config, spec.mlp_bias_key, True)


def _check_refit(model: nn.Module, keep_by_layer: dict[int, torch.Tensor],
                 refit: dict[int, hooks.TokenStats]) -> None:
    for index in keep_by_layer:
        stats = refit.get(index)
        width = arch.mlp_parts(model, index).width
        if stats is None or stats.gram is None or stats.gram.shape != (width, width):
            raise ValueError(f"refit needs activation statistics with a Gram matrix for layer {index} "
                             "(hooks.capture_mlp_activations(model, gram=True)) captured on this model")


def remove_mlp_neurons(model: nn.Module, keep_by_layer: dict[int, torch.Tensor],
                       refit: dict[int, hooks.TokenStats] | None = None,
                       outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Keep only the given neurons of each listed layer's MLP (in place), update the config, return the model.

    With ``refit`` (per-layer activation stats with Gram matrices), the output projection of each
    pruned layer is refitted by least squares (``refit_output``) so the layer's output changes as
    little as possible on the calibration tokens; the MLP then carries an output bias. ``outputs``
    gives the new output projections directly ({layer: (weight (hidden, k), bias (hidden,))}, as
    ``sequential_obs`` computes them).
    """
    spec = arch.get_spec(model)
    keep_by_layer = _check_keep(model, keep_by_layer)
    new_outputs = {}
    if outputs is not None:
        for index, (weight, bias) in outputs.items():
            hidden = _linear_layout(arch.mlp_parts(model, index).output).shape[0]
            if index not in keep_by_layer or weight.shape != (hidden, keep_by_layer[index].numel()) \
                    or bias.shape != (hidden,):
                raise ValueError(f"layer {index}: outputs must be (weight (hidden, kept), bias (hidden,)) for a "
                                 "layer listed in keep_by_layer")
        new_outputs = dict(outputs)
        _enable_mlp_bias(model)
    elif refit is not None:  # compute every refit before touching the model: a failed solve changes nothing
        _check_refit(model, keep_by_layer, refit)
        for index, keep in keep_by_layer.items():
            out = arch.mlp_parts(model, index).output
            new_outputs[index] = refit_output(_linear_layout(out), out.bias, refit[index], keep)
        _enable_mlp_bias(model)
    for index, keep in keep_by_layer.items():
        mlp = getattr(arch.decoder_layers(model)[index], spec.mlp)
        for name in spec.mlp_inputs:
            setattr(mlp, name, _sliced(getattr(mlp, name), keep, neurons_out=True))
        out = _sliced(getattr(mlp, spec.mlp_output), keep, neurons_out=False)
        if index in new_outputs:
            weight, bias = new_outputs[index]  # (hidden, k) and (hidden,)
            _write_output(out, weight, bias)
        setattr(mlp, spec.mlp_output, out)
        if hasattr(mlp, "intermediate_size"):  # Llama's MLP records its width
            mlp.intermediate_size = keep.numel()
    _update_config(model)
    return model


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def layer_inputs(model: nn.Module, calibration: list[dict]) -> list[tuple[torch.Tensor, dict]]:
    """Per batch: the hidden states entering the first decoder layer and the keyword arguments it receives.

    The forward pass stops there. Every decoder layer of the supported families takes the same keyword
    arguments (attention mask, position embeddings), so a layer can then be run alone:
    ``layer(hidden, **kwargs)``. (For models mixing sliding-window and full-attention layers the masks differ
    only beyond the window, far longer than calibration samples.)
    """
    importance.require_batches(calibration, "layer_inputs")
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().clone(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    device = next(model.parameters()).device
    handle = arch.decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calibration:
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _output_moments(activations: list[torch.Tensor], mids: list[torch.Tensor], targets: list[torch.Tensor],
                    masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x x^T] and E[x t^T] over real tokens, x = (a, 1), t = target - mid: what an MLP output projection must write.

    Per batch: ``activations`` (the output projection's inputs a), ``mids`` (the residual stream just before the
    MLP adds its output), ``targets`` (the layer output wanted). float64 on the CPU.
    """
    width, hidden = activations[0].shape[-1], mids[0].shape[-1]
    gram = torch.zeros(width + 1, width + 1, dtype=torch.float64)
    cross = torch.zeros(width + 1, hidden, dtype=torch.float64)
    count = 0
    for act, mid, target, mask in zip(activations, mids, targets, masks, strict=True):
        x = hooks.select_tokens(act, mask).double()
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        t = hooks.select_tokens(target - mid, mask).double()
        gram += (x.T @ x).cpu()
        cross += (x.T @ t).cpu()
        count += x.shape[0]
    return gram / count, cross / count


def _two_streams(model: nn.Module, calibration: list[dict]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict], list[torch.Tensor | None]]:
    """The start of a two-stream pass: (reference stream, a copy to prune, per-batch layer kwargs, masks)."""
    captured = layer_inputs(model, calibration)
    masks = [batch["attention_mask"].bool() if "attention_mask" in batch else None for batch in calibration]
    return ([hidden for hidden, _ in captured], [hidden.clone() for hidden, _ in captured],
            [kwargs for _, kwargs in captured], masks)


def _run_tapped(model: nn.Module, index: int, stream: list[torch.Tensor], arguments: list[dict]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Run decoder layer ``index`` on ``stream``: (outputs, output-projection inputs, residual before the MLP)."""
    spec = arch.get_spec(model)
    layer = arch.decoder_layers(model)[index]
    activations, mlp_outputs = [], []
    taps = [arch.mlp_parts(model, index).output.register_forward_pre_hook(lambda m, args: activations.append(args[0])),
            getattr(layer, spec.mlp).register_forward_hook(lambda m, a, out: mlp_outputs.append(_hidden_out(out)))]
    try:
        outs = [_hidden_out(layer(h, **kw)) for h, kw in zip(stream, arguments, strict=True)]
    finally:
        for tap in taps:
            tap.remove()
    return outs, activations, [out - m for out, m in zip(outs, mlp_outputs, strict=True)]


@torch.no_grad()
def sequential_obs(model: nn.Module, ratios: dict[int, float], calibration: list[dict], multiple_of: int = 1,
                   chunk: int = 32, ridge: float = 1e-3, refit_ridge: float = 0.1
                   ) -> tuple[dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """OBS selection and refit layer by layer, each layer seeing the hidden states of the model pruned so far.

    ``prune_mlp(method="obs")`` measures every layer on the unpruned model's activations, so each layer is
    repaired for inputs it will never see once the layers before it are pruned. Here the calibration tokens
    travel two streams through the decoder (as in SparseGPT, Frantar & Alistarh 2023): the unpruned model's,
    and the pruned model's. At layer l the pruned stream gives the activations a of the (still whole) MLP,
    and the target is the *unpruned* model's output of layer l, so the kept neurons also absorb the drift the
    earlier layers introduced. The full least-squares solution of the output projection is computed,
    ``_obs_remove`` drops neurons down to the kept width, the kept columns and a bias are refitted
    (``_ridge_refit``, pulled towards the original columns by ``refit_ridge``), and the pruned stream moves on
    through the pruned layer. The model is not modified: returns ({layer: kept indices}, {layer: (weight,
    bias)}) for ``remove_mlp_neurons(model, keep, outputs=...)``. Cost: about two forward passes over the
    calibration batches, plus one (width + 1)^2 Gram matrix per layer.
    """
    multiple_of = _check_multiple_of(multiple_of)
    layers = arch.decoder_layers(model)
    per_layer = _per_layer_ratios(ratios, range(len(layers)))
    reference, pruned, arguments, masks = _two_streams(model, calibration)
    keep_by_layer, outputs = {}, {}
    for index, layer in enumerate(layers):
        parts = arch.mlp_parts(model, index)
        width = parts.width
        n_keep = kept_width(width, per_layer[index], multiple_of)
        reference = [_hidden_out(layer(h, **kw)) for h, kw in zip(reference, arguments, strict=True)]
        outs, activations, mids = _run_tapped(model, index, pruned, arguments)
        if n_keep >= width:
            pruned = outs
            continue
        hidden = outs[0].shape[-1]
        gram, cross = _output_moments(activations, mids, reference, masks)
        out = parts.output
        weight = _linear_layout(out).double().cpu()
        bias = out.bias.detach().double().cpu() if out.bias is not None else torch.zeros(hidden, dtype=torch.float64)
        original = torch.cat([weight, bias[:, None]], dim=1)  # (hidden, width + 1)
        hessian = gram.clone()
        hessian[range(width), range(width)] += ridge * gram.diagonal()[:width].mean()
        rhs = cross + (hessian - gram) @ original.T  # ridge towards the original weights
        full = torch.linalg.solve(hessian, rhs).T.contiguous()  # best full-width output projection
        keep = _obs_remove(full, torch.linalg.inv(hessian), width, n_keep, chunk)
        rows = torch.cat([keep, torch.tensor([width])])
        new_weight, new_bias = _ridge_refit(gram[rows][:, rows], cross[rows], weight[:, keep], refit_ridge)
        keep_by_layer[index], outputs[index] = keep, (new_weight, new_bias)
        device = outs[0].device
        w, c = new_weight.to(device, outs[0].dtype), new_bias.to(device, outs[0].dtype)
        pruned = [mid + act[..., keep.to(device)] @ w.T + c for mid, act in zip(mids, activations, strict=True)]
    return keep_by_layer, outputs


ALLOCATIONS = ("uniform", "sensitivity")
SELECTIONS = ("obs", "obs_sequential")  # selection strategies usable as ``method`` besides importance.METHODS


def prune_mlp(model: nn.Module, ratio: float, method: str = "max_abs", calibration: list[dict] | None = None,
              protect: Iterable[int] = (), multiple_of: int = 1, allocation: str | dict[int, float] = "uniform",
              refit: bool = False, power: float = 2.0,
              stats: dict[int, hooks.TokenStats] | None = None) -> PruneReport:
    """Remove MLP neurons in place: ``ratio`` of them on average, lowest ``method`` scores first.

    - ``method``: a score from ``importance.METHODS``, or ``"obs"`` (Optimal Brain Surgeon selection,
      ``obs_keep``; implies ``refit``), or ``"obs_sequential"`` (the same, layer by layer on the pruned
      model's own activations, refitted towards the unpruned model's layer outputs: ``sequential_obs``;
      needs ``calibration``, and is the most accurate choice here).
    - ``allocation``: ``"uniform"`` (each unprotected layer loses ``ratio``), ``"sensitivity"``
      (``layer_sensitivity`` measured on the first calibration batch, with a refitted probe when the
      method refits, then ``allocate_ratios`` with ``power``; the mean over all layers is ``ratio``), or a
      {layer: ratio} dict.
    - ``refit``: least-squares refit of each pruned layer's output projection (``refit_output``).
    - ``stats``: activation statistics already collected on this model (``importance.collect_stats``,
      with ``gram=True`` for refit/OBS/sensitivity) to skip the calibration pass.
    Everything is validated before the model changes; a ``ValueError`` leaves it untouched.
    """
    arch.get_spec(model)
    ratio = check_ratio(ratio)
    if method == "obs_sequential" and not calibration:
        raise ValueError("method='obs_sequential' runs the calibration tokens through the model layer by layer: "
                         "pass calibration=data.calibration_batches(...) (stats alone are not enough)")
    if method in SELECTIONS:
        refit = True
    elif stats is None:
        importance.check_calibration(method, calibration)
    protect = tuple(arch.check_layer_index(model, i) for i in protect)
    multiple_of = _check_multiple_of(multiple_of)
    if isinstance(allocation, dict):
        _per_layer_ratios(allocation, range(arch.num_layers(model)))
    elif allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS} or a {{layer: ratio}} dict; got {allocation!r}")
    needs_gram = (refit and method != "obs_sequential") or allocation == "sensitivity"
    if needs_gram and not calibration and (stats is None or allocation == "sensitivity"):
        raise ValueError(f"method={method!r}, refit={refit}, allocation={allocation!r} needs calibration data: "
                         "pass calibration=data.calibration_batches(...)")
    params_before = count_parameters(model)
    if stats is not None:
        if needs_gram:
            _check_refit(model, {i: None for i in range(arch.num_layers(model))}, stats)
    else:
        wanted = calibration and (needs_gram or method not in SELECTIONS)
        stats = importance.collect_stats(model, calibration, gram=needs_gram) if wanted else {}
    score_method = "wanda_like" if method in SELECTIONS else method
    if allocation == "sensitivity":
        sensitivity = layer_sensitivity(model, stats, calibration[:1], method=score_method, refit=refit)
        ratios = allocate_ratios(sensitivity, ratio, power=power, protect=protect)
    elif isinstance(allocation, dict):
        ratios = dict(allocation)
    else:
        ratios = {i: (0.0 if i in protect else ratio) for i in range(arch.num_layers(model))}
    outputs = None
    if method == "obs_sequential":
        ratios = {i: (0.0 if i in protect else r) for i, r in ratios.items()}
        keep, outputs = sequential_obs(model, ratios, calibration, multiple_of=multiple_of)
    elif method in SELECTIONS:
        keep = {}
        for i in range(arch.num_layers(model)):
            width = arch.mlp_parts(model, i).width
            n_keep = width if i in protect else kept_width(width, ratios[i], multiple_of)
            keep[i] = obs_keep(model, i, stats[i], n_keep) if n_keep < width else torch.arange(width)
    else:
        scores = importance.score_model(model, method, stats=stats)
        keep = select_neurons(scores, ratios, protect=protect, multiple_of=multiple_of)
    if outputs is not None:
        remove_mlp_neurons(model, keep, outputs=outputs)
        keep = {i: keep.get(i, torch.arange(arch.mlp_parts(model, i).width)) for i in range(arch.num_layers(model))}
    else:
        remove_mlp_neurons(model, keep, refit=stats if refit else None)
    return PruneReport(method=method, ratio=ratio, params_before=params_before, params_after=count_parameters(model),
                       kept_width={i: int(k.numel()) for i, k in keep.items()})


# ---------------------------------------------------------------------------------------------
# Depth pruning: removing whole decoder layers
# ---------------------------------------------------------------------------------------------

def check_layer_set(model: nn.Module, indices: Iterable[int], what: str = "layers to remove",
                    allow_all: bool = False) -> list[int]:
    """Validate a set of layer indices (ints in range, no duplicates, not every layer); return them sorted."""
    indices = list(indices)
    for i in indices:
        arch.check_layer_index(model, i)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what} contain duplicates: {sorted(indices)}; name each layer once")
    n = arch.num_layers(model)
    if not allow_all and len(indices) >= n:
        raise ValueError(f"cannot remove all {n} layers ({what}: {sorted(indices)}); keep at least one")
    return sorted(indices)


def sync_structure_config(model: nn.Module) -> None:
    """Write what the modules now look like into the config (layer count, MLP widths, bypassed attention)."""
    from . import bypass

    spec = arch.get_spec(model)
    setattr(model.config, spec.n_layers_key, arch.num_layers(model))
    _update_config(model)
    bypassed = bypass.bypassed_layers(model)
    if bypassed:
        model.config.bypassed_attention = bypassed  # from_pretrained ignores this: needs load_pruned
    elif hasattr(model.config, "bypassed_attention"):
        del model.config.bypassed_attention


def contiguous_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted indices grouped into (first, last) runs of consecutive layers: [3, 4, 7] -> [(3, 4), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


@torch.no_grad()
def linear_replacements(model: nn.Module, runs: list[tuple[int, int]], calibration: list[dict],
                        ridge: float = 0.01) -> dict[int, torch.Tensor]:
    """For each run of layers to remove, a (hidden, hidden) map T to fold into the MLP just before the run.

    ReplaceMe (Shopkhoev et al. 2025): with ``y`` the residual stream entering the MLP of layer
    ``first - 1``, ``m`` that MLP's output and ``target`` the output of layer ``last``, solve
    min E||y + m T - target||^2 + ridge * s * ||T - I||^2 (s = mean E[m_i^2]; T = I means "just drop")
    in closed form. Folding T into the MLP's output projection costs no parameters, so the pruned model
    is still a stock model. Runs that start at layer 0 have no MLP before them and get no map.
    """
    spec = arch.get_spec(model)
    layers = arch.decoder_layers(model)
    wanted = {first: last for first, last in runs if first > 0}
    if not wanted:
        return {}
    hidden = getattr(model.config, spec.hidden_key)
    moments = {f: torch.zeros(hidden, hidden, dtype=torch.float64) for f in wanted}  # E[m m^T] (summed)
    cross = {f: torch.zeros(hidden, hidden, dtype=torch.float64) for f in wanted}  # E[m (target - y - m)^T]
    count = 0
    seen: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor | None] = {"m": None}
    handles = []
    for first, last in wanted.items():
        before = layers[first - 1]

        def residual_in(module, args, first=first):
            seen[f"y{first}"] = hooks.select_tokens(args[0], mask["m"]).double()

        def mlp_out(module, args, output, first=first):
            seen[f"m{first}"] = hooks.select_tokens(hooks._hidden(output), mask["m"]).double()

        def block_out(module, args, output, first=first):
            m, y = seen.pop(f"m{first}"), seen.pop(f"y{first}")
            target = hooks.select_tokens(hooks._hidden(output), mask["m"]).double()
            moments[first] += (m.T @ m).cpu()
            cross[first] += (m.T @ (target - y - m)).cpu()

        handles.append(getattr(before, spec.norms[1]).register_forward_pre_hook(residual_in))
        handles.append(getattr(before, spec.mlp).register_forward_hook(mlp_out))
        handles.append(layers[last].register_forward_hook(block_out))
    device = next(model.parameters()).device
    with hooks._hooks(handles):
        for batch in calibration:
            mask["m"] = batch.get("attention_mask")
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            count += int(mask["m"].sum()) if mask["m"] is not None else batch["input_ids"].numel()
    maps = {}
    eye = torch.eye(hidden, dtype=torch.float64)
    for first in wanted:
        damping = ridge * moments[first].diagonal().mean() / count
        lhs = moments[first] / count + damping * eye
        # minimiser of E||m (T - I) - (target - y - m)||^2 + damping ||T - I||^2, written as T = I + D
        maps[first] = (eye + torch.linalg.solve(lhs, cross[first] / count)).float()
    return maps


@torch.no_grad()
def refit_after_removal(model: nn.Module, indices: Iterable[int], calibration: list[dict], ridge: float = 0.1
                        ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """New MLP output projections for the layers that stay when ``indices`` go, so the pruned model tracks the original.

    The two-stream procedure of ``sequential_obs`` applied to depth pruning: the calibration tokens run through
    the original decoder and through the decoder without ``indices``. Each kept layer's output projection (all
    its neurons, plus a bias) is refitted by least squares (``_ridge_refit``, pulled towards the current weights
    by ``ridge``) so that, on the pruned stream, the layer writes what the *original* model has in its residual
    stream just before the next kept layer: the layer before a removed run learns to stand in for the run (this
    contains ReplaceMe's linear map as a special case), and every later layer absorbs the drift. Closed form,
    one (width + 1)^2 Gram matrix per kept layer, about two forward passes. The model is not modified: returns
    {original layer index: (weight (hidden, width), bias (hidden,))}; ``drop_layers(..., refit=True)`` applies it.
    """
    drop = set(check_layer_set(model, indices))
    importance.require_batches(calibration, "refit_after_removal")
    n = arch.num_layers(model)
    kept = [i for i in range(n) if i not in drop]
    target_of = {i: (kept[j + 1] - 1 if j + 1 < len(kept) else n - 1) for j, i in enumerate(kept)}
    layers = arch.decoder_layers(model)
    reference, pruned, arguments, masks = _two_streams(model, calibration)  # original / without the dropped layers
    done, outputs = -1, {}
    for index in kept:
        while done < target_of[index]:  # the original stream runs ahead to the output the layer must match
            done += 1
            reference = [_hidden_out(layers[done](h, **kw)) for h, kw in zip(reference, arguments, strict=True)]
        _, activations, mids = _run_tapped(model, index, pruned, arguments)
        gram, cross = _output_moments(activations, mids, reference, masks)
        out = arch.mlp_parts(model, index).output
        weight, bias = _ridge_refit(gram, cross, _linear_layout(out).double().cpu(), ridge)
        outputs[index] = (weight, bias)
        w, c = weight.to(mids[0].device, mids[0].dtype), bias.to(mids[0].device, mids[0].dtype)
        pruned = [mid + act @ w.T + c for mid, act in zip(mids, activations, strict=True)]
    return outputs


def _fold_map(model: nn.Module, index: int, transform: torch.Tensor) -> None:
    """Multiply the output of layer ``index``'s MLP by ``transform`` (hidden, hidden), inside its output projection."""
    proj = arch.mlp_parts(model, index).output
    t = transform.to(proj.weight.device, proj.weight.dtype)
    with torch.no_grad():
        if isinstance(proj, nn.Linear):  # weight (hidden, width): out = a W^T -> a W^T T = a (T^T W)^T
            proj.weight.copy_(t.T @ proj.weight)
        else:  # Conv1D weight (width, hidden): out = a W -> a W T
            proj.weight.copy_(proj.weight @ t)
        if proj.bias is not None:
            proj.bias.copy_(proj.bias @ t)


def drop_layers(model: nn.Module, indices: Iterable[int], calibration: list[dict] | None = None,
                ridge: float = 0.01, refit: bool = False, refit_ridge: float = 0.1) -> nn.Module:
    """Remove decoder layers ``indices`` in place; renumber the rest so the KV cache stays consistent.

    Updates the layer count and every per-layer config list (e.g. ``layer_types``); a model saved
    afterwards reloads with plain ``from_pretrained`` (unless other surgery needs ``load_pruned``).
    With ``calibration``, each run of removed layers is replaced by a linear map folded into the MLP
    before it (``linear_replacements``, ReplaceMe): still a stock model, usually a much smaller loss.
    With ``calibration`` and ``refit=True``, every kept layer's MLP output projection is refitted instead
    (``refit_after_removal``, two streams, ``refit_ridge``): the strongest choice measured here; the MLPs then
    carry a bias (a stock config flag for Llama, ``mlp_bias``).
    Bad indices (out of range, duplicates, every layer) raise ``ValueError`` and leave the model as it was.
    """
    spec = arch.get_spec(model)
    drop = set(check_layer_set(model, indices))
    if spec is arch.GPT2 and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this GPT-2 scales attention by 1/(layer_idx + 1): renumbered layers would compute "
                         "differently after reload; depth pruning is not supported for it")
    if calibration is not None and not calibration:
        raise ValueError("calibration is empty: pass data.calibration_batches(...) or None for a plain drop")
    if refit and not calibration:
        raise ValueError("refit=True fits the kept layers on calibration tokens: pass calibration=...")
    if refit:
        outputs = refit_after_removal(model, drop, calibration, refit_ridge)  # computed before anything changes
        _enable_mlp_bias(model)
        for index, (weight, bias) in outputs.items():
            _write_output(arch.mlp_parts(model, index).output, weight, bias)
    elif calibration:
        for first, transform in linear_replacements(model, contiguous_runs(drop), calibration, ridge).items():
            _fold_map(model, first - 1, transform)
    layers = arch.decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    for key in spec.per_layer_keys:
        values = getattr(model.config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == len(layers):
            setattr(model.config, key, [v for i, v in enumerate(values) if i not in drop])
    parent_path, _, name = spec.layers.rpartition(".")
    setattr(arch.get_module(model, parent_path), name, nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, spec.attn)
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the KV cache is indexed by this
    sync_structure_config(model)
    return model
