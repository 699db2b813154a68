"""How much each part of a model matters: MLP neurons, whole decoder layers, attention sub-layers.

Higher = more important everywhere. The second half of the file scores layers (``block_influence``,
``angular_distance``, ``removal_loss``: depth pruning) and attention sub-layers
(``attention_importance``: attention bypass).

A neuron ``j`` of an MLP is one output of the input projection(s) (GPT-2's ``c_fc``, or the Llama
family's ``gate_proj`` and ``up_proj``) and one input of the output projection (``c_proj`` /
``down_proj``). Removing it deletes a row of weights going in and a column going out.

Two kinds of score:
- static, from the weights alone: L1, L2, max |w|, max + |min|, variance, product of norms;
- data-aware, from activation statistics over calibration tokens (``hooks.capture_mlp_activations``)
  times the norm of the neuron's output weights: ``activation_norm`` (mean |a| x ||w_out||),
  ``wanda_like`` (Wanda, Sun et al. 2023: sqrt(mean a^2) x ||w_out||) and ``flap`` (FLAP, An et al.
  2024: the fluctuation Var(a) x ||w_out||^2, how much the output moves when the neuron is replaced
  by its mean).

Every scorer takes the layer's ``arch.MLPParts`` (and ``TokenStats`` for data-aware ones) and returns
a (width,) float32 tensor. ``METHODS`` is the registry that notebooks, benchmarks and the CLI read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import arch, hooks
from .hooks import TokenStats


def input_rows(parts: arch.MLPParts) -> list[torch.Tensor]:
    """The weights producing each neuron, one (width, hidden) float32 tensor per input projection."""
    # nn.Linear stores (out=width, in=hidden); Conv1D stores (in=hidden, out=width), so transpose it
    return [(p.weight if isinstance(p, nn.Linear) else p.weight.T).detach().float() for p in parts.inputs]


def output_columns(parts: arch.MLPParts) -> torch.Tensor:
    """The weights each neuron writes to the residual stream: (width, hidden) float32."""
    w = parts.output.weight.detach().float()
    # nn.Linear stores (out=hidden, in=width) -> transpose; Conv1D already stores (in=width, out=hidden)
    return w.T if isinstance(parts.output, nn.Linear) else w


def l1_norm(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """Sum of |w| over the neuron's input weights (gate and up rows summed for GLU)."""
    return sum(w.abs().sum(1) for w in input_rows(parts))


def l2_norm(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """L2 norm of all the neuron's input weights taken together (gate and up rows concatenated)."""
    return sum(w.pow(2).sum(1) for w in input_rows(parts)).sqrt()


def max_abs(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """Largest |w| among the neuron's input weights (max over gate and up for GLU)."""
    return torch.stack([w.abs().amax(1) for w in input_rows(parts)]).amax(0)  # (n_inputs, width) -> (width,)


def max_plus_min(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """max(w) + |min(w)| of each input row: the spread of its weights (summed over gate and up)."""
    return sum(w.amax(1) + w.amin(1).abs() for w in input_rows(parts))


def weight_variance(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """Population variance of the neuron's input weights (gate and up rows concatenated)."""
    return torch.cat(input_rows(parts), dim=1).var(1, correction=0)  # (width, n_inputs * hidden) -> (width,)


def product_of_norms(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """||gate row|| x ||up row|| for GLU; ||c_fc column|| x ||c_proj row|| for GPT-2."""
    rows = input_rows(parts)
    if len(rows) == 2:
        return rows[0].norm(dim=1) * rows[1].norm(dim=1)
    return rows[0].norm(dim=1) * output_columns(parts).norm(dim=1)


def _checked_stats(parts: arch.MLPParts, stats: TokenStats | None) -> TokenStats:
    if stats is None or stats.count == 0:
        raise ValueError("this score needs activation statistics: pass the layer's TokenStats "
                         "(hooks.capture_mlp_activations) or call score_model(..., calibration=...)")
    if stats.sum.shape[0] != parts.width:
        raise ValueError(f"activation statistics have {stats.sum.shape[0]} features but the MLP has "
                         f"{parts.width} neurons: were they captured on another layer or model?")
    return stats


def activation_norm(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """mean |a| x ||w_out||: average activation size times the size of what the neuron writes."""
    stats = _checked_stats(parts, stats)
    return stats.mean_abs.to(parts.output.weight.device) * output_columns(parts).norm(dim=1)


def flap(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """Var(a) x ||w_out||^2, the fluctuation metric of FLAP (An et al. 2024)."""
    stats = _checked_stats(parts, stats)
    return stats.var.to(parts.output.weight.device) * output_columns(parts).pow(2).sum(1)


def wanda_like(parts: arch.MLPParts, stats: TokenStats | None = None) -> torch.Tensor:
    """sqrt(mean a^2) x ||w_out||, Wanda's |W| x ||X|| (Sun et al. 2023) summed over a neuron's outputs."""
    stats = _checked_stats(parts, stats)
    return stats.mean_sq.sqrt().to(parts.output.weight.device) * output_columns(parts).norm(dim=1)


@dataclass(frozen=True)
class Scorer:
    """One entry of the registry of neuron-importance methods."""

    name: str  # key in METHODS, used by notebooks, benchmarks and the CLI
    fn: Callable[[arch.MLPParts, TokenStats | None], torch.Tensor]  # (parts, stats) -> (width,) scores
    needs_data: bool  # True: needs activation statistics from calibration batches
    description: str  # one line for tables and --help


METHODS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("l1", l1_norm, False, "L1 norm of the neuron's input weights"),
    Scorer("l2", l2_norm, False, "L2 norm of the neuron's input weights"),
    Scorer("max_abs", max_abs, False, "largest |w| among the neuron's input weights"),
    Scorer("max_plus_min", max_plus_min, False, "max(w) + |min(w)| of the input weights"),
    Scorer("variance", weight_variance, False, "variance of the neuron's input weights"),
    Scorer("product_of_norms", product_of_norms, False, "||gate|| x ||up|| (GLU) or ||in|| x ||out|| (GPT-2)"),
    Scorer("activation_norm", activation_norm, True, "mean |activation| x ||output weights||"),
    Scorer("flap", flap, True, "FLAP fluctuation: Var(activation) x ||output weights||^2"),
    Scorer("wanda_like", wanda_like, True, "Wanda-style: RMS activation x ||output weights||"),
)}


def get_scorer(method: str) -> Scorer:
    """The registry entry for ``method``; unknown names raise a ``ValueError`` listing them all."""
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def check_calibration(method: str, calibration: Iterable[dict] | None) -> None:
    """Raise if a data-aware ``method`` is given no calibration batches."""
    if get_scorer(method).needs_data and not calibration:
        raise ValueError(f"importance method {method!r} needs calibration data: "
                         "pass calibration=data.calibration_batches(...)")


def score_layer(model: nn.Module, index: int, method: str, stats: TokenStats | None = None) -> torch.Tensor:
    """Scores (width,) of the MLP neurons of decoder layer ``index``, float32 on the CPU."""
    scorer = get_scorer(method)
    parts = arch.mlp_parts(model, index)
    return scorer.fn(parts, stats).float().cpu()


@torch.no_grad()
def collect_stats(model: nn.Module, calibration: list[dict], gram: bool = False) -> dict[int, TokenStats]:
    """Per-layer activation statistics of every MLP over the calibration batches, in one pass (eval mode)."""
    if not calibration:
        raise ValueError("calibration data is empty: pass calibration=data.calibration_batches(...)")
    was_training = model.training
    model.eval()  # no dropout while measuring
    try:
        with hooks.capture_mlp_activations(model, gram=gram) as tap:
            tap.run(model, calibration)
    finally:
        model.train(was_training)
    return tap.stats


def score_model(model: nn.Module, method: str, calibration: list[dict] | None = None,
                stats: dict[int, TokenStats] | None = None) -> dict[int, torch.Tensor]:
    """Scores of every layer's MLP neurons; data-aware methods use ``stats`` or collect them from ``calibration``."""
    arch.get_spec(model)
    if stats is None:
        check_calibration(method, calibration)
        stats = collect_stats(model, calibration) if METHODS[method].needs_data else {}
    return {i: score_layer(model, i, method, stats.get(i)) for i in range(arch.num_layers(model))}


# ---------------------------------------------------------------------------------------------
# Layer scores (depth pruning) and attention-sublayer scores (attention bypass)
# ---------------------------------------------------------------------------------------------

def require_batches(calibration: list[dict] | None, what: str) -> None:
    """Raise a ``ValueError`` naming ``what`` and the fix when ``calibration`` is missing or empty."""
    if not calibration:
        raise ValueError(f"{what} needs calibration data: pass calibration=data.calibration_batches(...)")


@torch.no_grad()
def block_influence(model: nn.Module, calibration: list[dict], skip: Iterable[int] = ()) -> torch.Tensor:
    """Per decoder layer: mean over real tokens of 1 - cos(layer input, layer output), shape (n_layers,).

    Block Influence of ShortGPT (Men et al. 2024): a layer whose output points where its input already
    pointed changes little and is the first candidate for removal. Layers in ``skip`` are treated as
    already removed (they pass their input through) and score 0.
    """
    require_batches(calibration, "block_influence")
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
    require_batches(calibration, "angular_distance")
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
    Layers in ``skip`` are treated as already removed (entry 0). It costs one calibration pass per layer,
    so ``candidates`` can restrict it to a shortlist (e.g. the lowest ``block_influence``); the other
    entries are ``inf``.
    """
    from .evaluation import calibration_loss

    require_batches(calibration, "removal_loss")
    skip = set(skip)
    n = arch.num_layers(model)
    candidates = set(range(n)) if candidates is None else {arch.check_layer_index(model, i) for i in candidates}
    with hooks.skip_layers(model, skip):
        base = calibration_loss(model, calibration)
    result = torch.full((n,), float("inf"))
    for index in range(n):
        if index in skip:
            result[index] = 0.0
        elif index in candidates:
            with hooks.skip_layers(model, skip | {index}):
                result[index] = calibration_loss(model, calibration) - base
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


@torch.no_grad()
def attention_importance(model: nn.Module, calibration: list[dict]) -> torch.Tensor:
    """Per layer: mean over real tokens of 1 - cos(h, h + attn(norm(h))), shape (n_layers,).

    He et al. 2024 ("What Matters in Transformers? Not All Attention is Needed"): an attention sub-layer
    that barely turns the residual stream can be bypassed. A bypassed sub-layer adds nothing and scores 0.
    """
    require_batches(calibration, "attention_importance")
    n = arch.num_layers(model)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    pending: dict[int, torch.Tensor] = {}

    def on_attention(index: int, added: torch.Tensor) -> None:
        pending[index] = added  # what attention adds, (n_tokens, hidden); the layer hook fires next

    def on_layer(index: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        h = inputs.float()
        cos = F.cosine_similarity(h, h + pending.pop(index).float(), dim=-1)  # (n_tokens,)
        total[index] += (1 - cos).sum().double().cpu()
        count[index] += cos.numel()

    device = next(model.parameters()).device
    with hooks.capture_attention_outputs(model, fn=on_attention) as attn_tap, \
            hooks.capture_layer_io(model, fn=on_layer) as layer_tap:
        for batch in calibration:
            attn_tap.set_mask(batch.get("attention_mask"))
            layer_tap.set_mask(batch.get("attention_mask"))
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    return (total / count.clamp_min(1)).float()
