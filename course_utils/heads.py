"""Attention-head pruning on grouped-query attention (GQA): remove heads without breaking the groups.

Under GQA a layer has ``n_kv`` key/value heads and ``n_heads = g * n_kv`` query heads; query head ``h``
reads K/V head ``h // g`` (``arch.AttentionParts.groups``). The attention code does not store that map: it
repeats each K/V head ``g`` times in order. Slicing query heads by index the way BERT-era code did (drop rows
of W_q and columns of W_o, keep K/V) therefore silently re-pairs the surviving query heads with the wrong
K/V heads whenever the groups lose different numbers of heads (lesson 10 measures what that costs).

``remove_heads`` accepts only removals that keep the map valid: in each layer, every K/V group keeps the
same number of its query heads, and a group that keeps none is removed whole (its K/V head too). Two common
patterns are special cases: whole KV groups (``group_heads``), and the same number of query heads from each
group. The projections become smaller modules (q/k/v rows, o columns), the module's ``num_key_value_groups``
is updated, and the config says what the layers hold: when every layer keeps the same counts the stock keys
(``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``) describe the model and plain
``from_pretrained`` reloads it; otherwise the per-layer counts are recorded as ``attention_heads`` for
``models.load_pruned``. Llama-family models only (separate q/k/v projections); GPT-2's fused ``c_attn`` is
refused with a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import arch, projections, structure
from .anatomy import count_parameters


def _has_heads(model: nn.Module, index: int) -> bool:
    spec = arch.get_spec(model)
    attn = arch.attention_module(model, index)
    return spec.attn_q is not None and getattr(attn, spec.attn_q, None) is not None


def head_counts(model: nn.Module) -> dict[int, tuple[int, int]]:
    """Layer -> (query heads, key/value heads), for every layer whose attention has heads (not bypassed)."""
    counts = {}
    for index in range(arch.num_layers(model)):
        if _has_heads(model, index):
            parts = arch.attention_parts(model, index)
            counts[index] = (parts.n_heads, parts.n_kv_heads)
    return counts


def group_heads(model: nn.Module, groups: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
    """The query heads of the given K/V groups ({layer: [group, ...]} -> {layer: [query head, ...]})."""
    out = {}
    for index, gs in groups.items():
        layout = arch.attention_parts(model, arch.check_layer_index(model, index)).groups()
        bad = [g for g in gs if not 0 <= int(g) < len(layout)]
        if bad:
            raise ValueError(f"layer {index}: K/V groups {bad} do not exist (it has {len(layout)})")
        out[index] = sorted(h for g in gs for h in layout[int(g)])
    return out


def plan(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> dict[int, tuple[list[int], list[int]]]:
    """Validate a removal and return {layer: (query heads kept, K/V heads kept)}; raises ``ValueError``."""
    spec = arch.get_spec(model)
    if spec.attn_q is None:
        raise ValueError(f"head pruning needs separate q/k/v projections (the Llama family); "
                         f"{type(model).__name__} fuses them (GPT-2's c_attn)")
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError("heads must be a non-empty {layer: [query head, ...]} mapping, e.g. {3: [0, 4]}")
    result = {}
    for index, removed in heads.items():
        arch.check_layer_index(model, index)
        if not _has_heads(model, index):
            raise ValueError(f"layer {index}: its attention is bypassed; there are no heads to remove")
        parts = arch.attention_parts(model, index)
        removed = [int(h) for h in removed]
        if len(set(removed)) != len(removed):
            raise ValueError(f"layer {index}: query heads {removed} contain duplicates")
        if any(not 0 <= h < parts.n_heads for h in removed):
            raise ValueError(f"layer {index}: query heads must be in [0, {parts.n_heads - 1}]; got {removed}")
        kept_by_group = [[h for h in members if h not in removed] for members in parts.groups()]
        sizes = {len(kept) for kept in kept_by_group if kept}
        if not sizes:
            raise ValueError(f"layer {index}: removing every head leaves no attention; bypass the sub-layer "
                             "(course_utils.bypass) or drop the layer (surgery.drop_layers) instead")
        if len(sizes) > 1:
            raise ValueError(
                f"layer {index}: the K/V groups would keep {[len(k) for k in kept_by_group]} query heads; under "
                "GQA every group must keep the same number (or none): remove whole groups (heads.group_heads) "
                "or the same number of query heads from each group")
        result[index] = ([h for kept in kept_by_group for h in kept],
                         [g for g, kept in enumerate(kept_by_group) if kept])
    return result


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def _slice_layer(model: nn.Module, index: int, q_keep: list[int], kv_keep: list[int]) -> None:
    spec = arch.get_spec(model)
    parts = arch.attention_parts(model, index)
    attn, hd = parts.module, parts.head_dim
    setattr(attn, spec.attn_q, projections.sliced(parts.q, _rows(q_keep, hd), dim="out"))
    setattr(attn, spec.attn_k, projections.sliced(parts.k, _rows(kv_keep, hd), dim="out"))
    setattr(attn, spec.attn_v, projections.sliced(parts.v, _rows(kv_keep, hd), dim="out"))
    setattr(attn, spec.attn_o, projections.sliced(parts.o, _rows(q_keep, hd), dim="in"))
    attn.num_key_value_groups = len(q_keep) // len(kv_keep)


def remove_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove the given query heads ({layer: [head, ...]}) in place, GQA-correctly; return the model.

    Every layer's request is checked first (``plan``): a ``ValueError`` leaves the model bit-identical.
    A K/V group whose query heads are all removed loses its K/V head too (the KV cache shrinks).
    """
    layout = plan(model, heads)
    params_before = count_parameters(model)
    for index, (q_keep, kv_keep) in layout.items():
        _slice_layer(model, index, q_keep, kv_keep)
    counts = {i: head_counts(model)[i] for i in layout}
    structure.record_edit(model, "remove_heads", "query / K/V heads per layer " + str(counts), params_before)
    return model


def kv_cache_values_per_token(model: nn.Module) -> int:
    """Numbers the KV cache stores per token: 2 (K and V) x K/V heads x head_dim, summed over layers."""
    return sum(2 * kv * arch.attention_parts(model, i).head_dim for i, (_, kv) in head_counts(model).items())


def _write_stock_keys(model: nn.Module) -> None:
    spec = arch.get_spec(model)
    counts = head_counts(model)
    if spec.attn_q is None or not counts:
        return
    head_dim = arch.attention_parts(model, next(iter(counts))).head_dim
    setattr(model.config, spec.n_heads_key, max(q for q, _ in counts.values()))
    setattr(model.config, spec.n_kv_heads_key, max(kv for _, kv in counts.values()))
    model.config.head_dim = head_dim  # no longer hidden_size // num_attention_heads once heads are removed


def _read_counts(model: nn.Module) -> list[list[int]] | None:
    counts = head_counts(model)
    if len(set(counts.values())) <= 1:
        return None  # uniform (or none left): the stock keys say it all
    full = (getattr(model.config, arch.get_spec(model).n_heads_key),
            getattr(model.config, arch.get_spec(model).n_kv_heads_key))
    return [list(counts.get(i, full)) for i in range(arch.num_layers(model))]


def _rebuild_counts(model: nn.Module, counts: list[list[int]]) -> None:
    if len(counts) != arch.num_layers(model):
        raise ValueError(f"attention_heads lists {len(counts)} layers but the model has {arch.num_layers(model)}")
    for index, (n_q, n_kv) in enumerate(counts):
        if not _has_heads(model, index):
            continue
        parts = arch.attention_parts(model, index)
        if (n_q, n_kv) != (parts.n_heads, parts.n_kv_heads):  # the first heads: the saved weights are in order
            _slice_layer(model, index, list(range(n_q)), list(range(n_kv)))


structure.register(structure.StructureKey(
    "attention_heads", "query / key-value head counts that differ per layer", _read_counts, _rebuild_counts,
    stock=_write_stock_keys))
