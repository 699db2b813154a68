"""Width pruning surgery: choose which MLP neurons to keep, then cut them out of the model for real.

Removing neuron ``j`` deletes its input weights (GPT-2: column ``j`` of ``c_fc`` and its bias;
Llama family: row ``j`` of ``gate_proj`` and ``up_proj`` and their biases) and its output weights
(GPT-2: row ``j`` of ``c_proj``; Llama: column ``j`` of ``down_proj``). The sliced projections are
new, smaller modules, so the model gets faster and smaller, not just sparser (LLM-Pruner, Ma et al.
2023; FLAP, An et al. 2024).

Every public function validates all of its inputs before touching the model: when it raises, the
model is exactly as it was.

Config: when every layer ends up with the same width, the family's width key (``n_inner`` /
``intermediate_size``) is updated and ``save_pretrained`` + ``from_pretrained`` just work. When
widths differ (protected layers), ``config.intermediate_sizes`` holds the per-layer list and the
width key holds the largest; ``from_pretrained`` cannot build such a model, it needs a custom loader.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import arch, importance
from .models import count_parameters


@dataclass
class PruneReport:
    """What ``prune_mlp`` did."""

    method: str  # importance method used to rank neurons
    ratio: float  # fraction of neurons removed in each unprotected layer
    params_before: int
    params_after: int
    kept_width: dict[int, int] = field(default_factory=dict)  # layer index -> MLP width after pruning

    def __str__(self) -> str:
        removed = 1 - self.params_after / self.params_before
        return (f"prune_mlp({self.method}, ratio={self.ratio}): {self.params_before / 1e6:.2f} M -> "
                f"{self.params_after / 1e6:.2f} M parameters (-{100 * removed:.1f} %); widths {self.kept_width}")


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` if it is a number in [0, 1), else raise a ``ValueError`` that says so."""
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1); got {ratio!r}")
    return float(ratio)


def _check_multiple_of(multiple_of: int) -> int:
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int >= 1; got {multiple_of!r}")
    return multiple_of


def kept_width(width: int, ratio: float, multiple_of: int = 1) -> int:
    """Neurons left after removing ``ratio`` of ``width``, rounded to a multiple of ``multiple_of``, in [1, width]."""
    rounded = math.floor(width * (1 - ratio) / multiple_of + 0.5) * multiple_of
    return min(width, max(rounded, multiple_of))


def select_neurons(scores: dict[int, torch.Tensor], ratio: float, protect: Iterable[int] = (),
                   multiple_of: int = 1) -> dict[int, torch.Tensor]:
    """Sorted indices of the highest-scoring neurons to keep in each layer; protected layers keep all."""
    ratio = check_ratio(ratio)
    multiple_of = _check_multiple_of(multiple_of)
    protect = set(protect)
    unknown = protect - set(scores)
    if unknown:
        raise ValueError(f"protected layers {sorted(unknown)} have no scores; scored layers: {sorted(scores)}")
    keep = {}
    for index, layer_scores in scores.items():
        width = layer_scores.shape[0]
        n_keep = width if index in protect else kept_width(width, ratio, multiple_of)
        order = torch.argsort(layer_scores.detach().cpu(), descending=True, stable=True)  # ties: lower index first
        keep[index] = order[:n_keep].sort().values
    return keep


def _check_keep(model: nn.Module, keep_by_layer: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Validate indices for every layer (range, duplicates, empty) and return them as sorted LongTensors."""
    checked = {}
    for index, keep in keep_by_layer.items():
        arch.check_layer_index(model, index)
        parts = arch.mlp_parts(model, index)
        for module in (*parts.inputs, parts.output):
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise ValueError(f"layer {index}: cannot slice a {type(module).__name__}; "
                                 "only nn.Linear and transformers Conv1D projections are supported")
        keep = torch.as_tensor(keep).detach().cpu()
        if keep.ndim != 1 or keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
            raise ValueError(f"layer {index}: keep indices must be a 1-D integer tensor; got {keep.dtype} "
                             f"of shape {tuple(keep.shape)}")
        if keep.numel() == 0:
            raise ValueError(f"layer {index}: keep indices are empty; an MLP needs at least one neuron")
        if keep.min() < 0 or keep.max() >= parts.width:
            raise ValueError(f"layer {index}: keep indices must be in [0, {parts.width - 1}]; "
                             f"got min {keep.min().item()}, max {keep.max().item()}")
        if keep.unique().numel() != keep.numel():
            raise ValueError(f"layer {index}: keep indices contain duplicates")
        checked[index] = keep.long().sort().values
    return checked


def _sliced(module: nn.Module, keep: torch.Tensor, neurons_out: bool) -> nn.Module:
    """A new projection holding only the ``keep`` neurons: its outputs if ``neurons_out``, else its inputs."""
    weight, bias = module.weight.detach(), module.bias
    keep = keep.to(weight.device)
    if isinstance(module, nn.Linear):  # weight (out, in)
        weight = weight[keep] if neurons_out else weight[:, keep]
        with torch.device("meta"):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:  # Conv1D: weight (in, out)
        weight = weight[:, keep] if neurons_out else weight[keep]
        with torch.device("meta"):
            new = Conv1D(weight.shape[1], weight.shape[0])  # Conv1D(nf=out, nx=in)
    new.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        bias = bias.detach()[keep] if neurons_out else bias.detach()
        new.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def _update_config(model: nn.Module) -> None:
    """Write the MLP widths into the config: one width key, or a per-layer list when they differ."""
    spec = arch.get_spec(model)
    widths = [arch.mlp_parts(model, i).width for i in range(arch.num_layers(model))]
    setattr(model.config, spec.intermediate_key, max(widths))
    if len(set(widths)) == 1:
        if hasattr(model.config, "intermediate_sizes"):
            del model.config.intermediate_sizes
    else:
        model.config.intermediate_sizes = widths  # from_pretrained ignores this: needs a custom loader


def remove_mlp_neurons(model: nn.Module, keep_by_layer: dict[int, torch.Tensor]) -> nn.Module:
    """Keep only the given neurons of each listed layer's MLP (in place), update the config, return the model."""
    spec = arch.get_spec(model)
    keep_by_layer = _check_keep(model, keep_by_layer)
    for index, keep in keep_by_layer.items():
        mlp = getattr(arch.decoder_layers(model)[index], spec.mlp)
        for name in spec.mlp_inputs:
            setattr(mlp, name, _sliced(getattr(mlp, name), keep, neurons_out=True))
        setattr(mlp, spec.mlp_output, _sliced(getattr(mlp, spec.mlp_output), keep, neurons_out=False))
        if hasattr(mlp, "intermediate_size"):  # Llama's MLP records its width
            mlp.intermediate_size = keep.numel()
    _update_config(model)
    return model


def prune_mlp(model: nn.Module, ratio: float, method: str = "max_abs", calibration: list[dict] | None = None,
              protect: Iterable[int] = (), multiple_of: int = 1) -> PruneReport:
    """Remove ``ratio`` of the MLP neurons of every unprotected layer, lowest ``method`` scores first (in place)."""
    arch.get_spec(model)
    ratio = check_ratio(ratio)
    importance.check_calibration(method, calibration)
    protect = tuple(arch.check_layer_index(model, i) for i in protect)
    multiple_of = _check_multiple_of(multiple_of)
    params_before = count_parameters(model)
    scores = importance.score_model(model, method, calibration)
    keep = select_neurons(scores, ratio, protect=protect, multiple_of=multiple_of)
    remove_mlp_neurons(model, keep)
    return PruneReport(method=method, ratio=ratio, params_before=params_before, params_after=count_parameters(model),
                       kept_width={i: int(k.numel()) for i, k in keep.items()})
