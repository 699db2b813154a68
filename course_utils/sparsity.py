"""Unstructured and N:M sparsity: which weights to zero, and masks that keep them zero.

Masks follow ``torch.nn.utils.prune``: ``apply_masks`` re-parametrises each weight as ``weight_orig * weight_mask``
(a forward pre-hook), so an optimiser updates ``weight_orig`` but a pruned weight never comes back during
fine-tuning; ``bake`` calls ``prune.remove`` and leaves a plain weight with its zeros. Only the decoder's
``nn.Linear`` projections are pruned (attention and MLP); embeddings, norms and the LM head stay dense.

Scores (higher = keep), each a dict {module name: tensor shaped like the weight}:
- ``magnitude``: |W| (Han et al. 2015), compared within each matrix or across all of them (``scope``);
- ``wanda``: |W| x ||X_j|| (Sun et al. 2024), the input feature norm over real calibration tokens, compared
  within each output row;
``sparsegpt`` goes further (Frantar and Alistarh 2023): layer by layer, it chooses the mask column by column
with the inverse Hessian of the layer's inputs and updates the remaining weights to absorb each removal
(the same second-order idea as the course's OBS neuron selection, per weight).
``nm=(2, 4)`` asks for 2:4 masks: in every group of 4 consecutive input weights of a row, 2 stay.

Per-layer sparsity: ``damage_curves`` measures what pruning each decoder layer alone costs at several sparsities
(loss increase on a probe), ``allocate`` turns the curves into per-layer sparsities with the same mean (lesson 03's
knapsack over the curves), and ``layer_masks`` / ``sparsegpt(..., sparsity=[...])`` prune each layer at its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from . import arch, hooks, streams
from .allocation import allocate_from_curves, check_grid
from .data import require_batches, to_device

SCOPES = ("row", "layer", "global")
DAMAGE_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)  # issue 17's allocation probe (results/logs/sparsity_alloc_probe_*)


def projections_by_layer(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per decoder layer, its linear projections (attention and MLP) by full module name, in forward order."""
    spec = arch.get_spec(model)
    if spec.attn_q is None:
        raise ValueError(f"sparsity helpers need nn.Linear projections (the Llama family); {type(model).__name__} "
                         "uses GPT-2's transposed Conv1D")
    layers = arch.decoder_layers(model)
    where = {id(module): name for name, module in model.named_modules()}
    return [{f"{where[id(layer)]}.{sub}": m for sub, m in layer.named_modules() if isinstance(m, nn.Linear)}
            for layer in layers]


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder's linear projections (attention and MLP), by module name, in forward order."""
    return {name: m for layer in projections_by_layer(model) for name, m in layer.items()}


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """|W| for every decoder projection."""
    return {name: module.weight.detach().abs().float() for name, module in linear_layers(model).items()}


@torch.no_grad()
def input_norms(model: nn.Module, calibration: list[dict]) -> dict[str, torch.Tensor]:
    """||X_j||_2 over real calibration tokens, per input feature of every decoder projection."""
    require_batches(calibration, "input_norms", model)
    modules = linear_layers(model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in modules.items()}
    mask: list[torch.Tensor] = []

    def hook(name):
        def fn(module, args):
            x = args[0].float() * mask[0][..., None]
            sums[name] += x.pow(2).sum((0, 1)).double().cpu()
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        for batch in calibration:
            batch = to_device(batch, model)
            mask[:] = [batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()]
            hooks.feed(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


def wanda_scores(model: nn.Module, calibration: list[dict]) -> dict[str, torch.Tensor]:
    """|W_ij| x ||X_j||: a weight matters as much as the inputs it multiplies (Wanda).

    The input norms come from one pass of the unpruned model. The Wanda paper's code (and llmcompressor by default)
    measures each layer on the output of the layers already pruned; on SmolLM2 that moved llmcompressor's PPL by
    +1.1 % at 50 % and +3.4 % at 2:4 (``benchmarks/sparsity.py``)."""
    norms = input_norms(model, calibration)
    return {name: module.weight.detach().abs().float() * norms[name].to(module.weight.device)
            for name, module in linear_layers(model).items()}


def check_sparsity(sparsity: float, nm: tuple[int, int] | None) -> None:
    if nm is not None:
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ValueError(f"nm must be (n, m) with 0 < n < m, e.g. (2, 4); got {nm}")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive weights along the input dimension."""
    out_f, in_f = score.shape
    if in_f % m:
        raise ValueError(f"{m} does not divide the input size {in_f}: N:M needs whole groups")
    groups = score.reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a (rows, n) tensor with exactly the ``k`` lowest scores of every row set False.

    Ties at the threshold go in index order, so the count is exact even on weights from a quantization grid
    (the offline SmolLM2's magnitudes repeat), and the result is deterministic. One ``kthvalue`` per row and
    a few element-wise passes: several times faster than sorting every row.
    """
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1): the k-th lowest score
    below = scores < threshold
    tied = scores == threshold
    still = k - below.sum(dim=1, keepdim=True)  # how many of the tied ones must go as well
    return ~(below | (tied & (tied.cumsum(dim=1) <= still)))


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float = 0.5, scope: str = "row",
                      nm: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks: the lowest-scoring ``sparsity`` share goes, within each row, matrix, or model-wide."""
    check_sparsity(sparsity, nm)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    if nm is not None:
        return {name: nm_mask(s, *nm) for name, s in scores.items()}
    if scope == "global":
        flat = torch.cat([s.flatten().cpu() for s in scores.values()])
        keep = drop_lowest(flat[None], int(sparsity * flat.numel()))[0]
        masks, start = {}, 0
        for name, s in scores.items():
            masks[name] = keep[start:start + s.numel()].reshape(s.shape).to(s.device)
            start += s.numel()
        return masks
    masks = {}
    for name, s in scores.items():
        if scope == "row":
            masks[name] = drop_lowest(s, int(sparsity * s.shape[1]))
        else:
            masks[name] = drop_lowest(s.reshape(1, -1), int(sparsity * s.numel())).reshape(s.shape)
    return masks


def layer_sparsities(model: nn.Module, sparsity: float | Sequence[float]) -> list[float]:
    """One sparsity per decoder layer: a number for every layer, or a list with one entry per layer (checked)."""
    n = arch.num_layers(model)
    values = [sparsity] * n if isinstance(sparsity, (int, float)) else [float(s) for s in sparsity]
    if len(values) != n:
        raise ValueError(f"give one sparsity per decoder layer ({n}); got {len(values)}")
    for value in values:
        check_sparsity(value, None)
    return values


def layer_masks(model: nn.Module, scores: dict[str, torch.Tensor], sparsity: float | Sequence[float],
                scope: str = "row") -> dict[str, torch.Tensor]:
    """``masks_from_scores`` with a sparsity per decoder layer (e.g. from ``allocate``), within rows or matrices."""
    if scope == "global":
        raise ValueError("per-layer sparsities need scope 'row' or 'layer'; 'global' draws one threshold for all")
    masks = {}
    for layer, share in zip(projections_by_layer(model), layer_sparsities(model, sparsity), strict=True):
        missing = sorted(set(layer) - set(scores))
        if missing:
            raise ValueError(f"no score for {missing[:3]}: scores must come from this model")
        masks.update(masks_from_scores({n: scores[n] for n in layer}, share, scope))
    return masks


@torch.no_grad()
def damage_curves(model: nn.Module, scores: dict[str, torch.Tensor], probe: list[dict],
                  grid: Iterable[float] = DAMAGE_GRID, scope: str = "row") -> torch.Tensor:
    """(layers, len(grid)): loss increase (nats/token on ``probe``) when layer l alone is pruned to each sparsity.

    Layer l's projections get ``masks_from_scores(scores, s, scope)`` (weights zeroed in place, restored right
    after: the model ends bit-identical); the loss is computed from the hidden states entering layer l, which are
    computed once per layer, so the cost is about len(grid) / 2 forward passes of ``probe`` per layer. Use probe
    batches kept apart from the ones the scores came from. ``allocate`` turns the curves into per-layer sparsities.
    """
    grid = check_grid(grid)
    require_batches(probe, "damage_curves", model)
    layers = projections_by_layer(model)
    missing = sorted({n for layer in layers for n in layer} - set(scores))
    if missing:
        raise ValueError(f"no score for {missing[:3]}: scores must come from this model")
    captured = streams.layer_inputs(model, probe)
    stream, arguments = [h for h, _ in captured], [kw for _, kw in captured]
    curves = torch.zeros(len(layers), len(grid))
    for index, (modules, layer) in enumerate(zip(layers, arch.decoder_layers(model), strict=True)):
        saved = {n: m.weight.detach().clone() for n, m in modules.items()}
        try:
            for j, share in enumerate(grid):
                masks = masks_from_scores({n: scores[n] for n in modules}, share, scope)
                for n, m in modules.items():
                    m.weight.mul_(masks[n].to(m.weight.device, m.weight.dtype))
                curves[index, j] = streams.loss_from(model, index, stream, arguments, probe)
                for n, m in modules.items():
                    m.weight.copy_(saved[n])
        finally:
            for n, m in modules.items():
                m.weight.copy_(saved[n])
        stream = streams.run_layer(layer, stream, arguments)
    base = streams.loss_from(model, len(layers), stream, arguments, probe)
    return curves - base


def allocate(model: nn.Module, curves: torch.Tensor, sparsity: float, grid: Iterable[float] = DAMAGE_GRID,
             max_sparsity: float = 0.9) -> list[float]:
    """Per-layer sparsities with mean ``sparsity`` that minimise the sum of the measured ``damage_curves``.

    ``allocation.allocate_from_curves`` (lesson 03's fractional knapsack over the curves' convex hulls); no layer
    goes past ``max_sparsity``. The mean of the layers' sparsities is the model's only when every decoder layer
    has as many projection weights (checked: true of every Llama-family model).
    """
    check_sparsity(sparsity, None)
    sizes = {sum(m.weight.numel() for m in layer.values()) for layer in projections_by_layer(model)}
    if len(sizes) != 1:
        raise ValueError(f"decoder layers of unequal size ({sorted(sizes)}): a mean of per-layer sparsities is not "
                         "the model's; allocate on a model whose layers are alike")
    if curves.shape[0] != arch.num_layers(model):
        raise ValueError(f"curves must have one row per decoder layer ({arch.num_layers(model)}); "
                         f"got {curves.shape[0]}: compute them with damage_curves on this model")
    shares = allocate_from_curves(curves, sparsity, grid=grid, max_ratio=max_sparsity)
    return [shares[i] for i in range(len(shares))]


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Re-parametrise each listed weight as weight_orig * weight_mask (``torch.nn.utils.prune``), in place."""
    modules = linear_layers(model)
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise ValueError(f"no decoder projection named {unknown[:3]}: masks must come from this model's scores")
    for name, mask in masks.items():
        if mask.shape != modules[name].weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"{name}: mask must be a bool tensor of shape {tuple(modules[name].weight.shape)}")
    for name, mask in masks.items():
        module = modules[name]  # pruned before (a second round): torch combines the new mask with the old one
        prune.custom_from_mask(module, "weight", mask.to(module.weight.device))
    return model


def bake(model: nn.Module) -> nn.Module:
    """Make every mask permanent: plain ``weight`` parameters with their zeros (``prune.remove``)."""
    for module in linear_layers(model).values():
        if prune.is_pruned(module):
            prune.remove(module, "weight")
    return model


def sparsity_of(model: nn.Module) -> float:
    """Share of zeros among the decoder projections' weights."""
    weights = [m.weight for m in linear_layers(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def _obs_prune(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
               blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one (out, in) weight with input Gram X^T X: (new weight, keep-mask)."""
    w = weight.detach().clone().float()
    h = gram.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    keep = torch.ones_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        d = torch.diag(h1)
        if nm is None:
            saliency = w1.pow(2) / d.pow(2)[None]
            k = int(saliency.numel() * sparsity)
            drop = torch.zeros_like(w1, dtype=torch.bool)
            if k:
                drop.view(-1)[saliency.flatten().argsort()[:k]] = True
        else:
            drop = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                saliency = w1[:, i:i + nm[1]].pow(2) / d[i:i + nm[1]].pow(2)[None]
                drop[:, i:i + nm[1]].scatter_(1, saliency.topk(nm[1] - nm[0], dim=1, largest=False).indices, True)
            q = w1[:, i].clone()
            q[drop[:, i]] = 0
            e = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None]
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~drop
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w.to(weight.dtype), keep


def sparsegpt(model: nn.Module, calibration: list[dict], sparsity: float | Sequence[float] = 0.5,
              nm: tuple[int, int] | None = None, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Prune every decoder projection with SparseGPT, layer by layer, in place; return the keep-masks.

    ``sparsity``: one share for every layer, or one per decoder layer (e.g. from ``allocate``; not with ``nm``).

    Each decoder layer sees the calibration inputs produced by the layers already pruned (sequential, as in
    the paper; ``streams`` runs one layer at a time, so the cost is about two forward passes in all). The updated
    weights are written directly and the masks applied with ``apply_masks``.
    """
    if nm is not None:
        check_sparsity(0.5, nm)
        if not isinstance(sparsity, (int, float)):
            raise ValueError("N:M fixes every layer's share (n/m): per-layer sparsities apply to unstructured masks")
        shares = [0.5] * arch.num_layers(model)  # not used by an N:M mask
    else:
        shares = layer_sparsities(model, sparsity)
    require_batches(calibration, "sparsegpt", model)
    if any(prune.is_pruned(m) for m in linear_layers(model).values()):
        raise ValueError("the model already carries masks: sparsity.bake(model) first, then run sparsegpt")
    if nm is not None:  # checked for every projection before any is changed, as nm_mask checks one
        odd = [n for n, m in linear_layers(model).items() if m.in_features % nm[1]]
        if odd:
            raise ValueError(f"{nm[1]} does not divide the input size of {odd[:3]}: N:M needs whole groups")
    captured = streams.layer_inputs(model, calibration)
    stream, arguments = [h for h, _ in captured], [kw for _, kw in captured]
    real = [batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool() for batch in calibration]
    masks: dict[str, torch.Tensor] = {}
    for index, modules in enumerate(projections_by_layer(model)):
        grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in modules.items()}
        current: list[torch.Tensor] = []

        def hook(name):
            def fn(module, args):
                x = args[0].float()[current[0].to(args[0].device)]  # (real tokens, in)
                grams[name] += (x.T @ x).double().cpu()
            return fn

        layer = arch.decoder_layers(model)[index]
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        with hooks.removing(handles), torch.no_grad():
            for h, kw, mask in zip(stream, arguments, real, strict=True):
                current[:] = [mask]
                layer(h, **kw)
        for n, m in modules.items():
            new, keep = _obs_prune(m.weight, grams[n].to(m.weight.device), shares[index], nm, damp=damp)
            with torch.no_grad():
                m.weight.copy_(new)
            masks[n] = keep
        with torch.no_grad():
            stream = streams.run_layer(layer, stream, arguments)  # what the next layer sees from the pruned one
    apply_masks(model, masks)
    return masks
