"""The structure record: every structural change a stock config cannot express, in one registry.

Most surgery leaves a model that a stock config describes: fewer layers (``num_hidden_layers``), one
narrower MLP width (``intermediate_size``), biases on a Llama's MLP (``mlp_bias``). ``sync(model)``
writes those stock keys. Some changes have no stock key: MLP widths that differ per layer, MLP
biases on a family whose stock MLP has none (Qwen2, Qwen3, Mistral), attention sub-layers that are
bypassed. Each such change is one ``StructureKey`` in ``REGISTRY``: how to *read* it off a model
(``None`` when absent), and how to *rebuild* it in a model freshly built from the stock config, which
is what ``models.load_pruned`` replays before loading the weights. A new kind of surgery adds one
entry (``register``) in its own file.

Every edit also appends an ``EditReport`` to ``history(model)``: parameters before and after, what
was removed, and which loader the result needs; ``models.save_pruned`` copies it into the model card.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import arch, projections
from .anatomy import count_parameters

STOCK_LOADER = "transformers.AutoModelForCausalLM.from_pretrained"
CUSTOM_LOADER = "course_utils.models.load_pruned"


@dataclass(frozen=True)
class StructureKey:
    """One structural change that a stock config cannot express."""

    key: str  # config key it is recorded under (saved in config.json)
    what: str  # one line for model cards and errors
    read: Callable[[nn.Module], Any]  # the model's current value, or None when the change is absent
    rebuild: Callable[[nn.Module, Any], None]  # apply a recorded value to a model built from the stock config
    stock: Callable[[nn.Module], None] | None = None  # writes the stock config keys this kind of change touches


REGISTRY: dict[str, StructureKey] = {}


def register(entry: StructureKey) -> StructureKey:
    """Add an entry to the registry (a module adding a kind of surgery calls this once, at import)."""
    if entry.key in REGISTRY and REGISTRY[entry.key] != entry:
        raise ValueError(f"structure key {entry.key!r} is registered twice")
    REGISTRY[entry.key] = entry
    return entry


def _mlp_widths(model: nn.Module) -> list[int]:
    return [arch.mlp_parts(model, i).width for i in range(arch.num_layers(model))]


def _read_widths(model: nn.Module) -> list[int] | None:
    widths = _mlp_widths(model)
    return widths if len(set(widths)) > 1 else None


def _rebuild_widths(model: nn.Module, widths: list[int]) -> None:
    spec = arch.get_spec(model)
    if len(widths) != arch.num_layers(model):
        raise ValueError(f"intermediate_sizes lists {len(widths)} layers but the model has {arch.num_layers(model)}")
    for index, width in enumerate(widths):
        mlp = getattr(arch.decoder_layers(model)[index], spec.mlp)
        keep = torch.arange(width)
        for name in spec.mlp_inputs:
            setattr(mlp, name, projections.sliced(getattr(mlp, name), keep, dim="out"))
        setattr(mlp, spec.mlp_output, projections.sliced(getattr(mlp, spec.mlp_output), keep, dim="in"))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


def mlp_projections(model: nn.Module) -> list[nn.Module]:
    """Every MLP projection of every decoder layer."""
    return [module for i in range(arch.num_layers(model))
            for module in (*arch.mlp_parts(model, i).inputs, arch.mlp_parts(model, i).output)]


def has_mlp_bias(model: nn.Module) -> bool:
    """True when the MLP projections carry biases."""
    return all(module.bias is not None for module in mlp_projections(model))


def _read_mlp_biases(model: nn.Module) -> bool | None:
    spec = arch.get_spec(model)
    if spec.mlp_always_biased or spec.mlp_bias_key is not None:
        return None  # biases are stock for this family (GPT-2 always, Llama through mlp_bias)
    return True if has_mlp_bias(model) else None


def add_mlp_biases(model: nn.Module, value: Any = True) -> None:
    """Give every MLP projection a (zero) bias, so the model can carry a refit's bias terms."""
    for module in mlp_projections(model):
        projections.ensure_bias(module)


register(StructureKey("intermediate_sizes", "MLP widths that differ per layer", _read_widths, _rebuild_widths))
register(StructureKey("mlp_biases", "biases on MLP projections of a family whose stock MLP has none",
                      _read_mlp_biases, add_mlp_biases))


def sync(model: nn.Module) -> nn.Module:
    """Write what the modules now look like into the config: stock keys, then every registry entry."""
    spec = arch.get_spec(model)
    config = model.config
    setattr(config, spec.n_layers_key, arch.num_layers(model))
    setattr(config, spec.intermediate_key, max(_mlp_widths(model)))
    if spec.mlp_bias_key is not None:
        setattr(config, spec.mlp_bias_key, has_mlp_bias(model))
    for entry in REGISTRY.values():
        if entry.stock is not None:
            entry.stock(model)
        value = entry.read(model)
        if value:
            setattr(config, entry.key, value)
        elif hasattr(config, entry.key):
            delattr(config, entry.key)
    return model


def custom_keys(config) -> list[str]:
    """The registry keys recorded in ``config`` (empty: a stock config describes the model)."""
    return [key for key in REGISTRY if getattr(config, key, None)]


def needs_custom_loader(config) -> bool:
    """True when a saved model's structure needs ``models.load_pruned`` rather than stock ``from_pretrained``."""
    return bool(custom_keys(getattr(config, "config", config)))


def loader_for(model_or_config) -> str:
    """The loader a saved copy of this model needs: stock ``from_pretrained`` or ``load_pruned``."""
    return CUSTOM_LOADER if needs_custom_loader(model_or_config) else STOCK_LOADER


def rebuild(model: nn.Module) -> nn.Module:
    """Replay every recorded change on a model freshly built from its (saved) config, in registry order."""
    for key in custom_keys(model.config):
        REGISTRY[key].rebuild(model, getattr(model.config, key))
    return model


@dataclass
class EditReport:
    """What one edit did to a model."""

    edit: str  # the function that made it, e.g. "drop_layers"
    summary: str  # what was removed, in one line
    params_before: int
    params_after: int
    loader: str  # how a saved copy reloads (STOCK_LOADER or CUSTOM_LOADER)

    def __str__(self) -> str:
        removed = 1 - self.params_after / self.params_before
        return (f"{self.edit}: {self.summary}; {self.params_before / 1e6:.2f} M -> {self.params_after / 1e6:.2f} M "
                f"parameters (-{100 * removed:.1f} %); reload with {self.loader}")

    def as_dict(self) -> dict:
        return asdict(self)


def record_edit(model: nn.Module, edit: str, summary: str, params_before: int) -> EditReport:
    """Sync the config, then append (and return) the report of an edit that just completed."""
    sync(model)
    report = EditReport(edit=edit, summary=summary, params_before=params_before,
                        params_after=count_parameters(model), loader=loader_for(model))
    history(model).append(report)
    return report


def history(model: nn.Module) -> list[EditReport]:
    """The reports of every edit made to this model object (a deep copy carries them along)."""
    if not isinstance(getattr(model, "pruning_history", None), list):
        model.pruning_history = []
    return model.pruning_history
