"""How much each MLP neuron matters (higher = more important).

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
from torch import nn

from .. import arch, hooks, projections
from ..data import require_batches
from ..hooks import TokenStats


def input_rows(parts: arch.MLPParts) -> list[torch.Tensor]:
    """The weights producing each neuron, one (width, hidden) float32 tensor per input projection."""
    return [projections.weight_out_in(p).float() for p in parts.inputs]


def output_columns(parts: arch.MLPParts) -> torch.Tensor:
    """The weights each neuron writes to the residual stream: (width, hidden) float32."""
    return projections.weight_out_in(parts.output).T.float()  # (hidden, width) -> (width, hidden)


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
    if get_scorer(method).needs_data:
        require_batches(calibration, f"importance method {method!r}")


def score_layer(model: nn.Module, index: int, method: str, stats: TokenStats | None = None) -> torch.Tensor:
    """Scores (width,) of the MLP neurons of decoder layer ``index``, float32 on the CPU."""
    scorer = get_scorer(method)
    parts = arch.mlp_parts(model, index)
    return scorer.fn(parts, stats).float().cpu()


@torch.no_grad()
def collect_stats(model: nn.Module, calibration: list[dict], gram: bool = False) -> dict[int, TokenStats]:
    """Per-layer activation statistics of every MLP over the calibration batches, in one pass (eval mode)."""
    require_batches(calibration, "collect_stats", model)
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
