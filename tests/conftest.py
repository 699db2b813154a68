"""Shared fixtures: tiny random GPT-2 and Llama models for unit tests, the offline SmolLM2 for integration."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("COURSE_PROFILE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer random GPT-2 (hidden 32, MLP 128, vocab 100)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama with GQA (hidden 32, MLP 64, 4 query / 2 KV heads, vocab 100)."""
    torch.manual_seed(seed)
    params = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    params.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**params)).eval()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    """Each unit test that takes this fixture runs on both families."""
    return tiny_gpt2() if request.param == "gpt2" else tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The offline Llama stand-in (SmolLM2-135M-Instruct) and its tokenizer, loaded once per session."""
    from course_utils.models import load_model

    return load_model("llama", "offline")


def padded_batch(seed: int = 0, batch: int = 3, seq: int = 10, vocab: int = 100):
    """Random ids with right padding: row i has ``seq - 2 * i`` real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        mask[row, seq - 2 * row:] = 0
        ids[row, seq - 2 * row:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def word_tokenizer():
    """A one-word fast tokenizer: enough for save_pruned / load_pruned round trips of tiny models."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel({"<unk>": 0}, "<unk>")),
                                   unk_token="<unk>")
