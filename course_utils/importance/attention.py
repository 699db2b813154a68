"""How much each attention sub-layer matters, for attention bypass (lower = first to skip).

He et al. 2024 ("What Matters in Transformers? Not All Attention is Needed"). Head scores for head
pruning join this file in lesson 10.
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
            model(**to_device(batch, model), use_cache=False)
    return (total / count.clamp_min(1)).float()
