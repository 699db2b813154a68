"""Int8 weight-only quantization through torchao, the way ``transformers`` applies it (``TorchAoConfig``).

Quantizing through ``from_pretrained`` (rather than calling torchao on a model in memory) is what makes the
result save with ``save_pretrained`` and reload with plain ``AutoModelForCausalLM.from_pretrained`` (torchao
installed): the config then carries its ``quantization_config``. Every ``nn.Linear`` but the output layer is
quantized (TorchAoConfig's default); the embedding stays float32.
"""

from __future__ import annotations

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
