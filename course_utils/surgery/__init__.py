"""Surgery: edits that change a model's structure for real (smaller modules, fewer layers).

- ``width``: MLP neurons (``prune_mlp``, ``remove_mlp_neurons``);
- ``depth``: whole decoder layers (``drop_layers``).
Attention bypass lives in ``course_utils.bypass`` and head pruning in ``course_utils.heads`` (both register
a structure key that ``models.load_pruned`` needs, so they sit below ``models``); ``remove_heads`` is
re-exported here. Sparsity masks and quantization join in lessons 11-12.

Every edit has the same shape, ``edit(model, what, *, calibration=None, protect=(), ...)``: it validates
everything before the first change (a ``ValueError`` leaves the model bit-identical), edits in place,
keeps the config in step (``structure.sync``) and appends an ``EditReport`` to
``structure.history(model)``. The helpers the lessons call through ``surgery`` (ratios and allocation,
sensitivity probes, closed-form refits) are re-exported here from the modules that own them.
"""

from .. import structure
from ..allocation import (
    CURVE_GRID,
    allocate_from_curves,
    allocate_ratios,
    check_ratio,
    kept_width,
    select_neurons,
)
from ..arch import check_layer_set
from ..heads import remove_heads
from ..refit import linear_replacements, obs_keep, obs_residuals, refit_after_removal, refit_output, sequential_obs
from ..sensitivity import calibrated_curves, damage_curves, layer_sensitivity, residual_curves
from ..streams import layer_inputs
from .depth import contiguous_runs, drop_layers
from .width import ALLOCATIONS, SELECTIONS, PruneReport, check_keep, prune_mlp, remove_mlp_neurons

sync_structure_config = structure.sync  # the name lessons 04-05 knew

__all__ = [
    "ALLOCATIONS", "CURVE_GRID", "SELECTIONS", "PruneReport", "allocate_from_curves", "allocate_ratios",
    "calibrated_curves", "check_keep", "check_layer_set", "check_ratio", "contiguous_runs", "damage_curves",
    "drop_layers", "kept_width", "layer_inputs", "layer_sensitivity", "linear_replacements", "obs_keep",
    "obs_residuals", "prune_mlp", "refit_after_removal", "refit_output", "remove_heads", "remove_mlp_neurons",
    "residual_curves", "select_neurons", "sequential_obs", "sync_structure_config",
]
