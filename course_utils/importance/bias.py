"""Which MLP neurons to prune for bias: a mix of bias reaction and structural importance, and its controls.

Lesson 09 removes a small number of neurons chosen model-wide (not a fixed share per layer). A neuron is a
strong candidate when it reacts to demographic terms (``course_utils.bias.specific_reaction``) and matters
little to the model (a structural score from ``importance.neurons``, e.g. ``wanda_like``). The two live on
unrelated scales, so they are mixed by rank, model-wide:

    candidate = weight * rank(reaction) + (1 - weight) * (1 - rank(importance)),   ranks in [0, 1],

in the spirit of OptiPFair's fairness pruning score (which mixes per-layer min-max normalised scores).
``weight=1`` is pure bias reaction, ``weight=0`` pure structural pruning. The controls a result must beat:
``random_like`` (as many neurons in each layer, drawn at random) and the structural choice at the same count.
"""

from __future__ import annotations

import torch

from .. import arch


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of the entries of x scaled to [0, 1] (ties broken by position), same shape."""
    flat = x.flatten()
    ranks = torch.empty_like(flat, dtype=torch.float64)
    ranks[flat.argsort(stable=True)] = torch.arange(flat.numel(), dtype=torch.float64)
    return (ranks / max(flat.numel() - 1, 1)).reshape(x.shape)


def hybrid_scores(reaction: torch.Tensor, importance: torch.Tensor, weight: float = 0.8) -> torch.Tensor:
    """(layers, width) pruning-candidate score: higher = prune first (see the module docstring)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight (share of the bias reaction) must be in [0, 1]; got {weight}")
    if reaction.shape != importance.shape:
        raise ValueError(f"reaction {tuple(reaction.shape)} and importance {tuple(importance.shape)} must have the "
                         "same (layers, width) shape: score the same layers of the same model")
    return weight * _ranks(reaction) + (1 - weight) * (1 - _ranks(importance))


def stack_scores(model, scores: dict[int, torch.Tensor]) -> torch.Tensor:
    """``importance.score_model``'s {layer: (width,)} as one (layers, width) tensor (uniform widths only)."""
    n = arch.num_layers(model)
    if sorted(scores) != list(range(n)):
        raise ValueError(f"need a score for each of the {n} layers; got layers {sorted(scores)}")
    widths = {scores[i].numel() for i in range(n)}
    if len(widths) != 1:
        raise ValueError(f"layers have different MLP widths {sorted(widths)}: score the unpruned model")
    return torch.stack([scores[i].float().cpu() for i in range(n)])


def top_neurons(scores: torch.Tensor, n: int) -> dict[int, torch.Tensor]:
    """The ``n`` highest-scoring neurons model-wide, as {layer: sorted neuron indices} (layers with none left out)."""
    layers, width = scores.shape
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < layers * width:
        raise ValueError(f"n must be an int in [1, {layers * width - 1}]; got {n!r}")
    flat = scores.flatten().topk(n).indices
    chosen: dict[int, list[int]] = {}
    for i in flat.tolist():
        chosen.setdefault(i // width, []).append(i % width)
    return {layer: torch.tensor(sorted(idx)) for layer, idx in sorted(chosen.items())}


def random_like(removed: dict[int, torch.Tensor], width: int, seed: int) -> dict[int, torch.Tensor]:
    """As many neurons in each layer as ``removed`` has, drawn at random (the like-with-like control)."""
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randperm(width, generator=generator)[:len(idx)].sort().values
            for layer, idx in removed.items()}


def keep_after_removing(model, removed: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """{layer: kept neuron indices} for ``surgery.remove_mlp_neurons``, from {layer: neurons to remove}.

    Indices may be tensors or plain lists."""
    keep = {}
    for layer, idx in removed.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        width = arch.mlp_parts(model, layer).width
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= width):
            raise ValueError(f"layer {layer}: neuron indices must be in [0, {width - 1}]")
        mask = torch.ones(width, dtype=torch.bool)
        mask[idx] = False
        keep[layer] = mask.nonzero().flatten()
    return keep
