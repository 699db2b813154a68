"""Measured damage: what removing a fraction of one layer's MLP neurons costs the whole model.

``layer_sensitivity`` probes every layer at one ratio, ``damage_curves`` at a grid of ratios (the input
of ``allocation.allocate_from_curves``). ``residual_curves`` is the cheap stand-in: each layer's OBS refit
residual at every grid ratio, closed-form from its Gram matrix (no forward pass), and ``calibrated_curves``
scales it to nats with one measured probe per layer instead of one per grid ratio.
A probe changes no weight: a temporary hook either silences the lowest-scoring neurons (replacing them by
their mean activation) or, with ``refit``, lets the kept neurons compensate exactly as the refit of
``refit.refit_output`` would. Each probe starts at the probed layer: the hidden states entering it are
carried from layer to layer (``streams``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import arch, importance, projections, streams
from .allocation import CURVE_GRID, check_grid, check_ratio, kept_width
from .data import require_batches
from .hooks import TokenStats
from .refit import check_gram, obs_residuals, refit_output


def damage_curves(model: nn.Module, stats: dict[int, TokenStats], calibration: list[dict],
                  grid: Iterable[float] = CURVE_GRID, refit: bool = True, method: str = "wanda_like") -> torch.Tensor:
    """(layers, len(grid)) loss increases: ``layer_sensitivity`` at every probe ratio of ``grid``.

    Row l is layer l's measured damage curve: what removing each fraction of its neurons alone costs on
    ``calibration`` (use batches kept apart from the ones ``stats`` came from). ``allocate_from_curves`` turns
    the curves into per-layer ratios. Cost: len(grid) x layers loss evaluations on ``calibration``, each
    starting at the probed layer (the hidden states entering it are computed once), so about half as many
    layer passes as len(grid) x layers full forward passes.
    """
    return _probe_damage(model, stats, calibration, check_grid(grid), method, refit)


def layer_sensitivity(model: nn.Module, stats: dict[int, TokenStats], calibration: list[dict],
                      probe_ratio: float = 0.5, method: str = "wanda_like", refit: bool = False) -> torch.Tensor:
    """Loss increase (nats/token on ``calibration``) when each layer alone loses ``probe_ratio`` of its neurons.

    The probe silences the lowest-``method`` neurons with a temporary hook (no copy, no surgery),
    replacing them by their mean activation; the model is unchanged afterwards. With ``refit`` (needs
    Gram matrices in ``stats``) the probe instead lets the kept neurons compensate (``refit_output``), so
    it measures what a layer costs a refitted model: the right yardstick for refit and OBS pruning.
    """
    return _probe_damage(model, stats, calibration, [check_ratio(probe_ratio)], method, refit)[:, 0]


def residual_curves(model: nn.Module, stats: dict[int, TokenStats], grid: Iterable[float] = CURVE_GRID,
                    chunk: int = 32, hessian_damp: float = 1e-3) -> torch.Tensor:
    """(layers, len(grid)) refit residuals: the mean squared error per token that OBS selection plus the best
    refit leave in each layer's MLP output when it loses each fraction of ``grid`` (``refit.obs_residuals``).

    Layer-local and in units of the hidden state, not of the loss: the same residual costs different layers
    different amounts of loss, hence ``calibrated_curves``. Cost: one OBS run per layer, no forward pass.
    """
    grid = check_grid(grid)
    check_gram(model, range(arch.num_layers(model)), stats, "residual curves")
    curves = torch.zeros(arch.num_layers(model), len(grid))
    for index in range(arch.num_layers(model)):
        width = arch.mlp_parts(model, index).width
        widths = [kept_width(width, ratio) for ratio in grid]
        residual = obs_residuals(model, index, stats[index], widths, chunk, hessian_damp)
        curves[index] = torch.tensor([residual[n] for n in widths])
    return curves


def calibrated_curves(model: nn.Module, stats: dict[int, TokenStats], calibration: list[dict],
                      grid: Iterable[float] = CURVE_GRID, probe_ratio: float = 0.75, smooth: int = 5, chunk: int = 32,
                      hessian_damp: float = 1e-3, residuals: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Damage curves for ``allocate_from_curves`` from one measured probe per layer: (curves, residuals).

    Each layer's ``residual_curves`` row is scaled to nats by the layer's measured, refitted damage at
    ``probe_ratio`` (``layer_sensitivity(..., refit=True)``, a ratio of ``grid``): the shape of the curve comes
    from the Gram matrix, its scale from the probe. With ``smooth`` > 1 a layer's scale (measured damage /
    residual at the probe) is the median of the scales of the ``smooth`` layers centred on it (fewer at the
    ends), so one noisy probe cannot make a layer look free. ``len(grid)`` times fewer probes than
    ``damage_curves``, which it approximates. Why these defaults (SmolLM2, 4 x 128 probe tokens): at a 30 % probe
    several layers read a negative damage (the probe's noise is larger than the signal), their curves came out
    flat and the allocation cut them by 75 %; a probe at 75 % with a 5-layer median got within 0.1-0.9 PPL of
    the allocation from fully measured curves on validation text (``results/logs/width_alloc_probe_2026-12-05``).
    ``smooth=1`` scales every layer by its own probe. ``residuals``: the ``residual_curves(model, stats, grid)``
    already computed (reused, e.g. across probes).
    """
    grid = check_grid(grid)
    if probe_ratio not in grid:
        raise ValueError(f"probe_ratio must be one of the grid ratios {grid}; got {probe_ratio!r}")
    if not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth is a number of layers (1 = no smoothing); got {smooth!r}")
    if residuals is None:
        residuals = residual_curves(model, stats, grid, chunk, hessian_damp)
    elif tuple(residuals.shape) != (arch.num_layers(model), len(grid)):
        raise ValueError(f"residuals must have shape (layers, len(grid)) = ({arch.num_layers(model)}, {len(grid)}), "
                         f"as residual_curves(model, stats, grid) gives; got {tuple(residuals.shape)}")
    measured = layer_sensitivity(model, stats, calibration, probe_ratio, refit=True).double()
    at_probe = residuals[:, grid.index(probe_ratio)].double()
    # a layer whose residual is 0 at the probe (nothing to remove) has no scale of its own: NaN, skipped by the median
    scale = torch.where(at_probe > 0, measured.clamp_min(0) / at_probe.clamp_min(1e-30),
                        torch.full_like(at_probe, float("nan")))
    half = smooth // 2
    pooled = torch.stack([scale[max(0, i - half):i + half + 1].nanquantile(0.5) for i in range(len(scale))])
    pooled = torch.nan_to_num(pooled, nan=0.0)
    return (residuals.double() * pooled[:, None]).float(), residuals


@torch.no_grad()
def _probe_damage(model: nn.Module, stats: dict[int, TokenStats], calibration: list[dict],
                  ratios: list[float], method: str, refit: bool) -> torch.Tensor:
    """(layers, len(ratios)) loss increases: layer l alone losing each ratio of its neurons (see ``layer_sensitivity``).

    The hidden states entering layer l are carried from layer to layer, so each probe runs layers l.. only.
    """
    require_batches(calibration, "layer_sensitivity", model)
    if any("attention_mask" not in batch for batch in calibration):
        raise ValueError("calibration batches need an attention_mask (data.calibration_batches(...) gives one)")
    if refit:
        check_gram(model, range(arch.num_layers(model)), stats, "a refitted sensitivity probe")
    device = next(model.parameters()).device
    captured = streams.layer_inputs(model, calibration)
    stream, arguments = [hidden for hidden, _ in captured], [kwargs for _, kwargs in captured]
    result = torch.zeros(arch.num_layers(model), len(ratios))
    for index, layer in enumerate(arch.decoder_layers(model)):
        order = importance.score_layer(model, index, method, stats.get(index)).argsort()
        output = arch.mlp_parts(model, index).output
        for column, ratio in enumerate(ratios):
            n_drop = order.numel() - kept_width(order.numel(), ratio)
            if refit:
                keep = order[n_drop:].sort().values
                weight, bias = refit_output(projections.weight_out_in(output), output.bias, stats[index], keep)
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
                result[index, column] = streams.loss_from(model, index, stream, arguments, calibration)
            finally:
                handle.remove()
        stream = streams.run_layer(layer, stream, arguments)
    # the stream has now run the whole unchanged model: its loss is the base, for the cost of the head alone
    return result - streams.loss_from(model, arch.num_layers(model), stream, arguments, calibration)
