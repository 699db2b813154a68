"""How much each part of a model matters; higher = more important everywhere.

- ``neurons``: MLP neurons (static weight scores and data-aware ones, the ``METHODS`` registry);
- ``layers``: whole decoder layers (depth pruning);
- ``attention``: attention sub-layers (attention bypass) and query heads (head pruning, ``head_scores``);
- ``bias``: which neurons to prune for bias (reaction mixed with importance by rank) and its random control.

Every public name is re-exported here: a notebook writes ``importance.block_influence``, and the
source of it is in ``importance/layers.py``.
"""

from ..data import require_batches
from ..hooks import TokenStats
from .attention import HEAD_SCORES, attention_importance, group_scores, head_scores, lowest_groups, random_groups
from .bias import hybrid_scores, keep_after_removing, random_like, stack_scores, top_neurons
from .layers import angular_distance, block_influence, greedy_layers, removal_loss
from .neurons import (
    METHODS,
    Scorer,
    activation_norm,
    check_calibration,
    collect_stats,
    flap,
    get_scorer,
    input_rows,
    l1_norm,
    l2_norm,
    max_abs,
    max_plus_min,
    output_columns,
    product_of_norms,
    score_layer,
    score_model,
    wanda_like,
    weight_variance,
)

__all__ = [
    "HEAD_SCORES", "METHODS", "Scorer", "TokenStats", "activation_norm", "angular_distance", "attention_importance",
    "block_influence", "check_calibration", "collect_stats", "flap", "get_scorer", "greedy_layers", "group_scores",
    "head_scores", "hybrid_scores",
    "input_rows", "keep_after_removing", "l1_norm", "l2_norm", "lowest_groups", "max_abs", "max_plus_min",
    "output_columns",
    "product_of_norms", "random_groups", "random_like", "removal_loss", "require_batches", "score_layer", "score_model",
    "stack_scores", "top_neurons", "wanda_like", "weight_variance",
]
