"""Width pruning: cut MLP neurons out of the model for real.

Removing neuron ``j`` deletes its input weights (GPT-2: column ``j`` of ``c_fc`` and its bias; Llama
family: row ``j`` of ``gate_proj`` and ``up_proj``) and its output weights (GPT-2: row ``j`` of
``c_proj``; Llama: column ``j`` of ``down_proj``). The sliced projections are new, smaller modules, so
the model gets faster and smaller, not just sparser (LLM-Pruner, Ma et al. 2023; FLAP, An et al. 2024).

``prune_mlp`` is the whole recipe in one call: a *score* ranks the neurons (``importance.METHODS``), or
a *selection* chooses them with the weights' second-order information (``"obs"``, ``"obs_sequential"``);
an *allocation* says how many each layer loses; an optional refit repairs the output projections.
Every edit validates all of its inputs before touching the model: when it raises, the model is exactly
as it was. The config is kept in step (``structure.sync``): uniform widths reload with plain
``from_pretrained``; per-layer widths are recorded for ``models.load_pruned``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import arch, importance, projections, structure
from ..allocation import (
    allocate_ratios,
    check_multiple_of,
    check_ratio,
    kept_width,
    per_layer_ratios,
    select_neurons,
)
from ..anatomy import count_parameters
from ..data import require_batches
from ..hooks import TokenStats
from ..refit import check_gram, obs_keep, refit_output, sequential_obs
from ..sensitivity import layer_sensitivity

ALLOCATIONS = ("uniform", "sensitivity")
SELECTIONS = ("top", "obs", "obs_sequential")  # how the kept neurons are chosen: by score, or by OBS


@dataclass
class PruneReport:
    """What ``prune_mlp`` did."""

    method: str  # the score (selection "top") or the selection that chose the neurons
    ratio: float  # mean fraction of neurons removed
    params_before: int
    params_after: int
    kept_width: dict[int, int] = field(default_factory=dict)  # layer index -> MLP width after pruning

    def __str__(self) -> str:
        removed = 1 - self.params_after / self.params_before
        widths = set(self.kept_width.values())
        shown = f"width {widths.pop()} in every layer" if len(widths) == 1 else f"widths {self.kept_width}"
        return (f"prune_mlp({self.method}, ratio={self.ratio}): {self.params_before / 1e6:.2f} M -> "
                f"{self.params_after / 1e6:.2f} M parameters (-{100 * removed:.1f} %); {shown}")


def check_keep(model: nn.Module, keep_by_layer: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Validate indices for every layer (range, duplicates, empty) and return them as sorted LongTensors."""
    checked = {}
    for index, keep in keep_by_layer.items():
        arch.check_layer_index(model, index)
        parts = arch.mlp_parts(model, index)
        for module in (*parts.inputs, parts.output):
            projections.check_projection(module, f"layer {index}")
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


def remove_mlp_neurons(model: nn.Module, keep_by_layer: dict[int, torch.Tensor], *,
                       refit: dict[int, TokenStats] | None = None,
                       outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Keep only the given neurons of each listed layer's MLP (in place), update the config, return the model.

    With ``refit`` (per-layer activation stats with Gram matrices), the output projection of each pruned
    layer is refitted by least squares (``refit.refit_output``) so the layer's output changes as little as
    possible on the calibration tokens; the MLP then carries biases. ``outputs`` gives the new output
    projections directly ({layer: (weight (hidden, k), bias (hidden,))}, as ``refit.sequential_obs``
    computes them).
    """
    spec = arch.get_spec(model)
    keep_by_layer = check_keep(model, keep_by_layer)
    params_before = count_parameters(model)
    new_outputs = {}
    if outputs is not None:
        for index, (weight, bias) in outputs.items():
            hidden = projections.out_features(arch.mlp_parts(model, index).output)
            if index not in keep_by_layer or weight.shape != (hidden, keep_by_layer[index].numel()) \
                    or bias.shape != (hidden,):
                raise ValueError(f"layer {index}: outputs must be (weight (hidden, kept), bias (hidden,)) for a "
                                 "layer listed in keep_by_layer")
        new_outputs = dict(outputs)
    elif refit is not None:  # compute every refit before touching the model: a failed solve changes nothing
        check_gram(model, keep_by_layer, refit, "refit")
        for index, keep in keep_by_layer.items():
            out = arch.mlp_parts(model, index).output
            new_outputs[index] = refit_output(projections.weight_out_in(out), out.bias, refit[index], keep)
    if new_outputs:
        structure.add_mlp_biases(model)
    for index, keep in keep_by_layer.items():
        mlp = getattr(arch.decoder_layers(model)[index], spec.mlp)
        for name in spec.mlp_inputs:
            setattr(mlp, name, projections.sliced(getattr(mlp, name), keep, dim="out"))
        out = projections.sliced(getattr(mlp, spec.mlp_output), keep, dim="in")
        if index in new_outputs:
            weight, bias = new_outputs[index]  # (hidden, k) and (hidden,)
            projections.write(out, weight, bias)
        setattr(mlp, spec.mlp_output, out)
        if hasattr(mlp, "intermediate_size"):  # Llama's MLP records its width
            mlp.intermediate_size = keep.numel()
    widths = {i: int(k.numel()) for i, k in keep_by_layer.items()}
    structure.record_edit(model, "remove_mlp_neurons", f"MLP widths {widths}" + (" (refitted)" if new_outputs else ""),
                          params_before)
    return model


def _split_method(method: str | None, score: str | None, selection: str) -> tuple[str, str]:
    """The (score, selection) pair from the shorthand ``method`` or the explicit pair."""
    if method is not None:
        if score is not None or selection != "top":
            raise ValueError("pass either method= (shorthand) or score= and selection=, not both")
        return ("wanda_like", method) if method in SELECTIONS[1:] else (method, "top")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
    return score or ("wanda_like" if selection != "top" else "max_abs"), selection


def prune_mlp(model: nn.Module, ratio: float, *, score: str | None = None, selection: str = "top",
              method: str | None = None, calibration: list[dict] | None = None, protect: Iterable[int] = (),
              multiple_of: int = 1, allocation: str | dict[int, float] = "uniform", refit: bool | None = None,
              power: float = 2.0, stats: dict[int, TokenStats] | None = None,
              reference: list[list[torch.Tensor]] | None = None) -> PruneReport:
    """Remove MLP neurons in place: ``ratio`` of them on average.

    - ``score``: a name from ``importance.METHODS`` (default ``"max_abs"``); with ``selection="top"`` the
      lowest-scoring neurons go.
    - ``selection``: ``"top"`` (by score), ``"obs"`` (Optimal Brain Surgeon, ``refit.obs_keep``) or
      ``"obs_sequential"`` (the same layer by layer on the pruned model's own activations,
      ``refit.sequential_obs``; needs ``calibration``; the most accurate choice here). OBS computes the new
      weights as it selects, so both always refit.
    - ``method``: shorthand for either: a score name, or ``"obs"`` / ``"obs_sequential"``.
    - ``allocation``: ``"uniform"`` (each unprotected layer loses ``ratio``), ``"sensitivity"``
      (``sensitivity.layer_sensitivity`` on the first calibration batch, refitted when the method refits, then
      ``allocation.allocate_ratios`` with ``power``; the mean over all layers is ``ratio``), or a
      {layer: ratio} dict.
    - ``refit``: least-squares refit of each pruned layer's output projection (``refit.refit_output``);
      default: on for the OBS selections, off for ``"top"``.
    - ``stats``: activation statistics already collected on this model (``importance.collect_stats``, with
      ``gram=True`` for refit/OBS/sensitivity) to skip the calibration pass.
    - ``reference``: ``"obs_sequential"`` only: the unpruned model's decoder-layer outputs on ``calibration``,
      recorded during the statistics pass (``with streams.recording_outputs(model) as reference:
      stats = importance.collect_stats(model, calibration, gram=True)``); saves one of its two passes.
    Everything is validated before the model changes; a ``ValueError`` leaves it untouched.
    """
    arch.get_spec(model)
    ratio = check_ratio(ratio)
    score, selection = _split_method(method, score, selection)
    importance.get_scorer(score)
    if refit is None:
        refit = selection != "top"
    elif not refit and selection != "top":
        raise ValueError(f"selection {selection!r} always refits (OBS computes the new weights as it removes "
                         "neurons): leave refit unset, or use selection='top' for a plain cut")
    label = score if selection == "top" else selection
    if calibration is not None:
        require_batches(calibration, "prune_mlp", model)
    if selection == "obs_sequential" and not calibration:
        raise ValueError("selection 'obs_sequential' runs the calibration tokens through the model layer by layer: "
                         "pass calibration=data.calibration_batches(...) (stats alone are not enough)")
    if reference is not None and selection != "obs_sequential":
        raise ValueError(f"reference (the unpruned model's recorded layer outputs) serves selection "
                         f"'obs_sequential' only; got selection {selection!r}: leave reference out")
    if selection == "top" and stats is None:
        importance.check_calibration(score, calibration)
    protect = tuple(arch.check_layer_index(model, i) for i in protect)
    multiple_of = check_multiple_of(multiple_of)
    n = arch.num_layers(model)
    if isinstance(allocation, dict):
        per_layer_ratios(allocation, range(n))
    elif allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS} or a {{layer: ratio}} dict; got {allocation!r}")
    needs_gram = (refit and selection != "obs_sequential") or allocation == "sensitivity"
    if needs_gram and not calibration and (stats is None or allocation == "sensitivity"):
        raise ValueError(f"selection={selection!r}, refit={refit}, allocation={allocation!r} needs calibration data: "
                         "pass calibration=data.calibration_batches(...)")
    if stats is not None and needs_gram:
        check_gram(model, range(n), stats, f"prune_mlp({label}, refit={refit})")
    params_before = count_parameters(model)
    if stats is None:
        wanted = calibration and (needs_gram or selection == "top")
        stats = importance.collect_stats(model, calibration, gram=needs_gram) if wanted else {}
    if allocation == "sensitivity":
        sensitivity = layer_sensitivity(model, stats, calibration[:1], method=score, refit=refit)
        ratios = allocate_ratios(sensitivity, ratio, power=power, protect=protect)
    elif isinstance(allocation, dict):
        ratios = dict(allocation)
    else:
        ratios = {i: ratio for i in range(n)}
    ratios = {i: (0.0 if i in protect else r) for i, r in ratios.items()}
    outputs = None
    if selection == "obs_sequential":
        keep, outputs = sequential_obs(model, ratios, calibration, multiple_of=multiple_of, reference=reference)
    elif selection == "obs":
        keep = {}
        for i in range(n):
            width = arch.mlp_parts(model, i).width
            n_keep = kept_width(width, ratios[i], multiple_of)
            keep[i] = obs_keep(model, i, stats[i], n_keep) if n_keep < width else torch.arange(width)
    else:
        scores = importance.score_model(model, score, stats=stats)
        keep = select_neurons(scores, ratios, protect=protect, multiple_of=multiple_of)
    if outputs is not None:
        remove_mlp_neurons(model, keep, outputs=outputs)
        keep = {i: keep.get(i, torch.arange(arch.mlp_parts(model, i).width)) for i in range(n)}
    else:
        remove_mlp_neurons(model, keep, refit=stats if refit else None)
    structure.history(model).pop()  # replaced by the report of the whole recipe
    report = PruneReport(method=label, ratio=ratio, params_before=params_before, params_after=count_parameters(model),
                         kept_width={i: int(k.numel()) for i, k in keep.items()})
    structure.record_edit(model, "prune_mlp", f"{label}, mean ratio {ratio}, widths {report.kept_width}"
                          + (" (refitted)" if refit else ""), params_before)
    return report
