"""The architecture table finds every part of GPT-2 and Llama models and refuses the rest."""

import pytest
from conftest import tiny_gpt2, tiny_llama
from torch import nn
from transformers import BertConfig, BertForMaskedLM, Qwen2Config, Qwen2ForCausalLM

from course_utils import arch


def test_gpt2_parts():
    model = tiny_gpt2()
    assert arch.get_spec(model) is arch.GPT2
    assert arch.num_layers(model) == 2
    mlp = arch.mlp_parts(model, 1)
    assert mlp.kind == "conv1d_pair" and mlp.width == 128 and mlp.output is model.transformer.h[1].mlp.c_proj
    attn = arch.attention_parts(model, 0)
    assert attn.qkv is model.transformer.h[0].attn.c_attn and attn.q is None
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (2, 2, 16)
    assert arch.intermediate_size(model) == 128  # n_inner=None means 4 x hidden


def test_llama_parts_with_gqa():
    model = tiny_llama()
    mlp = arch.mlp_parts(model, 0)
    assert mlp.kind == "glu" and mlp.width == 64
    assert mlp.inputs == [model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj]
    attn = arch.attention_parts(model, 1)
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (4, 2, 8)
    assert isinstance(attn.k, nn.Linear) and attn.k.out_features == 2 * 8


def test_qwen2_is_llama_family():
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    assert arch.get_spec(model) is arch.LLAMA_LIKE
    assert arch.get_spec(model).mlp == arch.LLAMA.mlp and arch.get_spec(model).mlp_bias_key is None  # no stock MLP bias
    assert arch.mlp_parts(model, 1).width == 64


def test_unsupported_model_lists_families():
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100))
    with pytest.raises(ValueError, match="unsupported architecture 'bert'.*GPT-2.*Llama"):
        arch.get_spec(bert)


@pytest.mark.parametrize("bad", [-1, 2, 1.0, True, "0"])
def test_layer_index_out_of_range(bad):
    with pytest.raises(ValueError, match=r"layer index must be an int in \[0, 1\]"):
        arch.mlp_parts(tiny_llama(), bad)
