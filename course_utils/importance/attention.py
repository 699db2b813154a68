"""How much each attention sub-layer matters, for attention bypass (lower = first to skip).

He et al. 2024 ("What Matters in Transformers? Not All Attention is Needed"); and how much each query
head matters, for head pruning (lesson 10): a weight norm, an output norm on calibration tokens, and a
first-order Taylor estimate (Michel et al. 2019; Molchanov et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import arch, hooks
from ..data import require_batches, to_device


@torch.no_grad()
def attention_importance(model: nn.Module, calibration: list[dict]) -> torch.Tensor:
    """Per layer: mean over real tokens of 1 - cos(h, h + attn(norm(h))), shape (n_layers,).

    He et al. 2024 ("What Matters in Transformers? Not All Attention is Needed"): an attention sub-layer
    that barely turns the residual stream can be bypassed. A bypassed sub-layer adds nothing and scores 0.
    """
    require_batches(calibration, "attention_importance", model)
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

    with hooks.capture_attention_outputs(model, fn=on_attention) as attn_tap, \
            hooks.capture_layer_io(model, fn=on_layer) as layer_tap:
        for batch in calibration:
            attn_tap.set_mask(batch.get("attention_mask"))
            layer_tap.set_mask(batch.get("attention_mask"))
            hooks.feed(model, batch)
    return (total / count.clamp_min(1)).float()


HEAD_SCORES = ("weight_norm", "output_norm", "taylor")


def _head_view(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """W_o (hidden, heads * head_dim) as (hidden, heads, head_dim)."""
    return weight.reshape(weight.shape[0], -1, head_dim)


def _layers_with_heads(model: nn.Module) -> list[int]:
    spec = arch.get_spec(model)
    if spec.attn_q is None:
        raise ValueError(f"head scores need separate q/k/v projections (the Llama family); {type(model).__name__} "
                         "fuses them (GPT-2's c_attn)")
    return [i for i in range(arch.num_layers(model))
            if getattr(arch.attention_module(model, i), spec.attn_q, None) is not None]


def head_scores(model: nn.Module, score: str, calibration: list[dict] | None = None, per: str = "head"
                ) -> torch.Tensor:
    """(layers, query heads) importance of every query head; higher = keep. Bypassed layers score 0.

    - ``weight_norm``: ||W_q rows of the head||^2 + ||W_o columns of the head||^2 (no data);
    - ``output_norm``: mean over real tokens of the L2 norm of what the head writes to the residual stream
      (its slice of the attention output times its W_o columns);
    - ``taylor``: first-order estimate of the loss change when the head is removed (Michel et al. 2019): the
      gradient of the loss with respect to a gate on the head's output (= the sum of grad x weight over its W_o
      columns), its absolute value per calibration sequence, summed over sequences (padding carries no loss).
    Layers must hold the same number of query heads (score before removing any).

    ``per="group"``: (layers, K/V groups), the importance of each whole K/V group (for ``lowest_groups``). For
    the norms it is the sum of the group's query heads (``group_scores``); for ``taylor`` it is the gate
    gradient of the whole group (the sum of its heads' gate gradients) in absolute value per sequence, which
    is not the sum of the heads' own scores: two heads whose effects cancel in a sequence make a cheap group.
    """
    if score not in HEAD_SCORES:
        raise ValueError(f"unknown head score {score!r}: use one of {HEAD_SCORES}")
    if per not in ("head", "group"):
        raise ValueError(f"per must be 'head' (query heads) or 'group' (K/V groups); got {per!r}")
    layers = _layers_with_heads(model)
    counts = {arch.attention_parts(model, i).n_heads for i in layers}
    if len(counts) > 1:
        raise ValueError("layers hold different numbers of query heads: score the model before removing heads")
    out = torch.zeros(arch.num_layers(model), counts.pop() if counts else 0)
    if score == "taylor":
        require_batches(calibration, f"head_scores({score!r})", model)
        return _taylor(model, layers, calibration, out, per)
    if per == "group":
        return group_scores(model, head_scores(model, score, calibration))
    if score == "weight_norm":
        for i in layers:
            parts = arch.attention_parts(model, i)
            q = parts.q.weight.detach().float().reshape(parts.n_heads, parts.head_dim, -1)
            o = _head_view(parts.o.weight.detach().float(), parts.head_dim)
            out[i] = q.pow(2).sum((1, 2)).cpu() + o.pow(2).sum((0, 2)).cpu()
        return out
    require_batches(calibration, f"head_scores({score!r})", model)
    return _output_norm(model, layers, calibration, out)


@torch.no_grad()
def _output_norm(model: nn.Module, layers: list[int], calibration: list[dict], out: torch.Tensor) -> torch.Tensor:
    total, count = torch.zeros_like(out, dtype=torch.float64), 0.0
    mask: list[torch.Tensor] = []

    def hook(index: int):
        parts = arch.attention_parts(model, index)

        def fn(module, args):
            x = args[0].float().reshape(*args[0].shape[:-1], parts.n_heads, parts.head_dim)  # (b, s, H, hd)
            w = _head_view(module.weight.float(), parts.head_dim)  # (hidden, H, hd)
            norms = torch.einsum("bshd,ohd->bsho", x, w).norm(dim=-1)  # (b, s, H)
            keep = mask[0].to(norms.device, norms.dtype)[..., None]
            total[index] += (norms * keep).sum((0, 1)).double().cpu()
        return fn

    handles = [arch.attention_parts(model, i).o.register_forward_pre_hook(hook(i)) for i in layers]
    try:
        for batch in calibration:
            batch = to_device(batch, model)
            m = batch.get("attention_mask")
            mask[:] = [m if m is not None else torch.ones_like(batch["input_ids"])]
            count += float(mask[0].sum())
            hooks.feed(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return (total / max(count, 1.0)).float()


def _taylor(model: nn.Module, layers: list[int], calibration: list[dict], out: torch.Tensor, per: str) -> torch.Tensor:
    """Sum over calibration sequences of |dL/d gate| for a gate multiplying each head's output (Michel et al.);
    with ``per="group"``, for a gate on each K/V group's heads (the sum of their gate gradients).

    A pre-hook on o_proj scales each sequence's slice of every head by a gate of 1 (the output is unchanged);
    one backward pass per batch gives every (sequence, head) gate gradient, which equals the sum over the head's
    W_o columns of gradient x weight from that sequence's tokens. The absolute value is taken per sequence:
    summed over a batch first, the signs cancel (the loss sits near a minimum) and the ranking is close to random.
    """
    if per == "group":
        parts = arch.attention_parts(model, layers[0]) if layers else None
        out = torch.zeros(out.shape[0], parts.n_kv_heads if parts else 0)
    total = torch.zeros_like(out, dtype=torch.float64)
    gates: dict[int, torch.Tensor] = {}

    def hook(index: int, head_dim: int):
        def fn(module, args):
            gate = gates[index].repeat_interleave(head_dim, dim=1)[:, None, :]  # (batch, 1, heads * head_dim)
            return (args[0] * gate.to(args[0].dtype),)
        return fn

    handles = [arch.attention_parts(model, i).o.register_forward_pre_hook(
        hook(i, arch.attention_parts(model, i).head_dim)) for i in layers]
    device = next(model.parameters()).device
    try:
        for batch in calibration:
            batch = to_device(batch, model)
            labels = batch["input_ids"].masked_fill(batch.get("attention_mask", 1) == 0, -100)
            for i in layers:
                n_heads = arch.attention_parts(model, i).n_heads
                gates[i] = torch.ones(batch["input_ids"].shape[0], n_heads, device=device, requires_grad=True)
            loss = model(**batch, labels=labels, use_cache=False).loss
            grads = torch.autograd.grad(loss, [gates[i] for i in layers])  # no .grad left on any weight
            for i, grad in zip(layers, grads, strict=True):
                if per == "group":  # (batch, heads) -> (batch, groups): query heads of a group are consecutive
                    grad = grad.reshape(grad.shape[0], total.shape[1], -1).sum(-1)
                total[i] += grad.abs().sum(0).double().cpu()
    finally:
        for handle in handles:
            handle.remove()
        gates.clear()
    return total.float()


def group_scores(model: nn.Module, per_head: torch.Tensor) -> torch.Tensor:
    """(layers, K/V groups): the sum of each group's query-head scores (for removing whole groups).

    Right for the additive norms; for ``taylor`` use ``head_scores(model, "taylor", calibration, per="group")``
    (a group's gate gradient per sequence is the sum of its heads', and |a + b| is not |a| + |b|).
    """
    layers = _layers_with_heads(model)
    parts = arch.attention_parts(model, layers[0])
    return per_head.reshape(per_head.shape[0], parts.n_kv_heads, parts.group_size).sum(-1)


def lowest_groups(model: nn.Module, grouped: torch.Tensor, n: int, keep: int = 1) -> dict[int, list[int]]:
    """The ``n`` K/V groups with the lowest scores model-wide, never taking a layer below ``keep`` groups.

    ``grouped``: (layers, groups) from ``group_scores``. Returns {layer: [group, ...]} for ``heads.group_heads``.
    """
    layers = set(_layers_with_heads(model))
    n_groups = grouped.shape[1]
    if not 0 < n <= len(layers) * (n_groups - keep):
        raise ValueError(f"n must be in [1, {len(layers) * (n_groups - keep)}] (keeping {keep} group(s) per layer)")
    chosen: dict[int, list[int]] = {}
    for flat in grouped.flatten().argsort(stable=True).tolist():
        layer, group = divmod(flat, n_groups)
        if layer in layers and len(chosen.get(layer, [])) < n_groups - keep:
            chosen.setdefault(layer, []).append(group)
            if sum(len(v) for v in chosen.values()) == n:
                break
    return {layer: sorted(gs) for layer, gs in sorted(chosen.items())}


def random_groups(model: nn.Module, n: int, seed: int, keep: int = 1) -> dict[int, list[int]]:
    """``n`` K/V groups drawn at random (the control), under the same rule as ``lowest_groups``."""
    layers = _layers_with_heads(model)
    n_groups = arch.attention_parts(model, layers[0]).n_kv_heads
    noise = torch.rand(arch.num_layers(model), n_groups, generator=torch.Generator().manual_seed(seed))
    return lowest_groups(model, noise, n, keep)
