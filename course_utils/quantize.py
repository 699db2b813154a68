"""Int8 weight-only quantization through torchao, the way ``transformers`` applies it (``TorchAoConfig``).

Quantizing through ``from_pretrained`` (rather than calling torchao on a model in memory) is what makes the
result save with ``save_pretrained`` and reload with plain ``AutoModelForCausalLM.from_pretrained`` (torchao
installed): the config then carries its ``quantization_config``. Every ``nn.Linear`` but the output layer is
quantized (TorchAoConfig's default); the embedding stays float32.

``int4_copy`` is the GPU variant: int4 weight-only through torchao's tinygemm kernels, CUDA only, in memory.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from . import models


def int8_copy(model: nn.Module, tokenizer, work: Path) -> nn.Module:
    """Int8 weight-only copy of ``model``, made the way from_pretrained applies torchao (so it saves and reloads)."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    models.save_pruned(model, tokenizer, work, verify=False)
    quantized = AutoModelForCausalLM.from_pretrained(
        work, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float32)
    return quantized.eval()


INT4_GROUP = 64  # weights per scale and zero; divides SmolLM2's 576 and the Llama widths (tinygemm: 32 to 256)


def int4_copy(model: nn.Module, group_size: int = INT4_GROUP) -> nn.Module:
    """A bfloat16 copy of ``model`` whose decoder projections are int4 weight-only (torchao, tinygemm's tile-packed
    layout); the embedding and the output layer stay bfloat16. CUDA only, and in memory only (no save).

    Measured on an H200 (``results/logs/cuda_2026-12-04_h200``, the same call): SmolLM2's projections took 47 % of
    bfloat16's bytes (tinygemm pads inputs to a multiple of 1,024) and its held-out PPL rose 34 %.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"int4 weight-only runs on torchao's CUDA kernels (tinygemm); this model is on {device.type}: "
                         "move it to a GPU, or use int8 (quantize.int8_copy) on a CPU")
    if group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size must be 32, 64, 128 or 256 (tinygemm's choices); got {group_size}")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    out = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(out, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d"),
              filter_fn=lambda module, name: isinstance(module, nn.Linear) and "lm_head" not in name)
    return out.eval()


def save_int8(model: nn.Module, tokenizer, target: Path, card: dict) -> None:
    """save_pretrained of the torchao model, a card, and the reload check (plain from_pretrained, same logits)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    lines = ["# Pruned and int8-quantized model", "", "Load with plain `AutoModelForCausalLM.from_pretrained(path)` "
             "(torchao must be installed: the config carries its `quantization_config`).", "",
             "| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in card.items()]
    (target / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = torch.arange(1, 17).unsqueeze(0) * max(1, model.config.vocab_size // 17)
    with torch.no_grad():
        if not torch.equal(model(ids).logits, reloaded(ids).logits):
            raise ValueError("the saved int8 model reloads to different logits; nothing was written")
