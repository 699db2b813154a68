"""Depth pruning: remove whole decoder layers, optionally repairing the cut.

The layers that stay are renumbered (``self_attn.layer_idx``: the KV cache is indexed by it) and every
per-layer config list (``layer_types``) follows, so a model saved afterwards reloads with plain
``from_pretrained``. Two repairs, both closed form (``refit``): a linear map folded into the MLP before
each removed run (ReplaceMe), or a refit of every kept layer's MLP output projection (two streams).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .. import arch, projections, structure
from ..anatomy import count_parameters
from ..data import require_batches
from ..refit import linear_replacements, refit_after_removal


def contiguous_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted indices grouped into (first, last) runs of consecutive layers: [3, 4, 7] -> [(3, 4), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def drop_layers(model: nn.Module, indices: Iterable[int], *, calibration: list[dict] | None = None,
                refit: bool = False, shrink_to_identity: float = 0.01, shrink_to_current: float = 0.1) -> nn.Module:
    """Remove decoder layers ``indices`` in place and return the model.

    - plain (no ``calibration``): the layers go, nothing else changes;
    - ``calibration``: each run of removed layers is replaced by a linear map folded into the MLP before it
      (``refit.linear_replacements``, ReplaceMe, damped by ``shrink_to_identity``): still a stock model;
    - ``calibration`` and ``refit=True``: every kept layer's MLP output projection is refitted instead
      (``refit.refit_after_removal``, damped by ``shrink_to_current``): the strongest choice measured here.
      The MLPs then carry biases: a stock config flag for Llama (``mlp_bias``), a structure record
      (``models.load_pruned``) for Qwen2, Qwen3 and Mistral.
    Bad input (indices out of range, duplicates, every layer, unusable calibration) raises ``ValueError``
    and leaves the model as it was.
    """
    spec = arch.get_spec(model)
    drop = set(arch.check_layer_set(model, indices))
    if spec.family == arch.GPT2.family and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this GPT-2 scales attention by 1/(layer_idx + 1): renumbered layers would compute "
                         "differently after reload; depth pruning is not supported for it")
    if calibration is not None:
        require_batches(calibration, "drop_layers", model)
    if refit and not calibration:
        raise ValueError("refit=True fits the kept layers on calibration tokens: pass calibration=...")
    params_before = count_parameters(model)
    how = "plain drop"
    if refit:
        outputs = refit_after_removal(model, drop, calibration, shrink_to_current)  # before anything changes
        structure.add_mlp_biases(model)
        for index, (weight, bias) in outputs.items():
            projections.write(arch.mlp_parts(model, index).output, weight, bias)
        how = "kept layers refitted"
    elif calibration:
        for first, transform in linear_replacements(model, contiguous_runs(drop), calibration,
                                                    shrink_to_identity).items():
            projections.fold_output_map(arch.mlp_parts(model, first - 1).output, transform)
        how = "linear replacement (ReplaceMe)"
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
    structure.record_edit(model, "drop_layers", f"layers {sorted(drop)} removed ({how})", params_before)
    return model
