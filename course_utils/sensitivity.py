"""Measured damage: what removing a fraction of one layer's MLP neurons costs the whole model.

``layer_sensitivity`` probes every layer at one ratio, ``damage_curves`` at a grid of ratios (the input
of ``allocation.allocate_from_curves``). A probe changes no weight: a temporary hook either silences the
lowest-scoring neurons (replacing them by their mean activation) or, with ``refit``, lets the kept neurons
compensate exactly as the refit of ``refit.refit_output`` would. Each probe starts at the probed layer:
the hidden states entering it are carried from layer to layer (``streams``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import arch, importance, projections, streams
from .allocation import CURVE_GRID, check_grid, check_ratio, kept_width
from .data import require_batches
from .hooks import TokenStats
from .refit import check_gram, refit_output


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
