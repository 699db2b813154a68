"""How much each decoder layer matters, for depth pruning (lower = first to go).

``block_influence`` (ShortGPT), ``angular_distance`` (Gromov et al.) and ``removal_loss`` (Shortened
LLaMA's criterion in log form) score layers; ``greedy_layers`` re-scores after each choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import arch, hooks, streams
from ..data import require_batches


@torch.no_grad()
def block_influence(model: nn.Module, calibration: list[dict], skip: Iterable[int] = ()) -> torch.Tensor:
    """Per decoder layer: mean over real tokens of 1 - cos(layer input, layer output), shape (n_layers,).

    Block Influence of ShortGPT (Men et al. 2024): a layer whose output points where its input already
    pointed changes little and is the first candidate for removal. Layers in ``skip`` are treated as
    already removed (they pass their input through) and score 0.
    """
    require_batches(calibration, "block_influence", model)
    n = arch.num_layers(model)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)

    def accumulate(index: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        cos = F.cosine_similarity(inputs.float(), outputs.float(), dim=-1)  # (n_tokens,)
        total[index] += (1 - cos).sum().double().cpu()
        count[index] += cos.numel()

    with hooks.skip_layers(model, skip), hooks.capture_layer_io(model, fn=accumulate) as tap:
        tap.run(model, calibration)
    return (total / count.clamp_min(1)).float()


@torch.no_grad()
def angular_distance(model: nn.Module, calibration: list[dict], n_block: int) -> torch.Tensor:
    """Mean angular distance arccos(cos(h_l, h_{l+n}))/pi between the input of layer l and the output of
    layer l+n-1, for every start l: shape (n_layers - n_block + 1,).

    Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): the contiguous block
    of ``n_block`` layers with the smallest distance changes the representation least.
    """
    require_batches(calibration, "angular_distance", model)
    n = arch.num_layers(model)
    if isinstance(n_block, bool) or not isinstance(n_block, int) or not 1 <= n_block < n:
        raise ValueError(f"n_block must be an int in [1, {n - 1}] for this {n}-layer model; got {n_block!r}")
    starts = n - n_block + 1
    total = torch.zeros(starts, dtype=torch.float64)
    count = 0
    with hooks.capture_layer_io(model, keep=True) as tap:
        for batch in calibration:
            tap.raw.clear()
            tap.run(model, [batch])
            ins = [tap.raw[i][0][0] for i in range(n)]  # input of layer i: (n_tokens, hidden)
            last_out = tap.raw[n - 1][0][1]
            for start in range(starts):
                end = ins[start + n_block] if start + n_block < n else last_out
                cos = F.cosine_similarity(ins[start].float(), end.float(), dim=-1).clamp(-1, 1)
                total[start] += (torch.arccos(cos) / torch.pi).sum().double()
            count += ins[0].shape[0]
    return (total / count).float()


@torch.no_grad()
def removal_loss(model: nn.Module, calibration: list[dict], skip: Iterable[int] = (),
                 candidates: Iterable[int] | None = None) -> torch.Tensor:
    """The direct criterion: calibration loss increase (nats/token) when each layer alone is removed.

    Shortened LLaMA (Kim et al. 2024) ranks layers by the perplexity they cost; this is its log form.
    Layers in ``skip`` are treated as already removed (entry 0). ``candidates`` can restrict it to a
    shortlist (e.g. the lowest ``block_influence``); the other entries are ``inf``. Each probe starts at its
    layer: the hidden states entering it are carried from layer to layer (``streams``), so a probe of layer l
    runs only the layers after l, and nothing runs past the last candidate.
    """
    require_batches(calibration, "removal_loss", model)
    skip = {arch.check_layer_index(model, i) for i in skip}
    n = arch.num_layers(model)
    candidates = set(range(n)) if candidates is None else {arch.check_layer_index(model, i) for i in candidates}
    captured = streams.layer_inputs(model, calibration)
    stream, arguments = [hidden for hidden, _ in captured], [kwargs for _, kwargs in captured]
    losses = {}
    todo = set(candidates - skip)
    for index, layer in enumerate(arch.decoder_layers(model)):
        if index in todo:
            losses[index] = streams.loss_from(model, index, stream, arguments, calibration, skip=skip | {index})
        if index not in skip:
            stream = streams.run_layer(layer, stream, arguments)
    # the stream that carried the probes has now run the whole (skipped) model: the base loss costs only the head
    base = streams.loss_from(model, n, stream, arguments, calibration)
    result = torch.full((n,), float("inf"))
    result[sorted(skip)] = 0.0
    for index, loss in losses.items():
        result[index] = loss - base
    return result


def greedy_layers(model: nn.Module, score: Callable[..., torch.Tensor], k: int, calibration: list[dict],
                  **kwargs) -> list[int]:
    """Iterative layer choice: take the lowest-scoring layer, re-score with the chosen ones skipped, repeat.

    ``score`` is a per-layer scorer taking ``skip=`` (``block_influence``, ``removal_loss``); extra keyword
    arguments go to it. Returns ``k`` layer indices in the order chosen, so ``[:j]`` is the j-layer choice.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < arch.num_layers(model):
        raise ValueError(f"k must be an int in [0, {arch.num_layers(model) - 1}]; got {k!r}")
    chosen: list[int] = []
    for _ in range(k):
        scores = score(model, calibration, skip=chosen, **kwargs).clone()
        scores[chosen] = float("inf")
        chosen.append(int(scores.argmin()))
    return chosen
