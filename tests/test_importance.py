"""Tests for course_utils.importance on tiny random GPT-2 and Llama models."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from course_utils import arch, hooks, importance

STATIC = [name for name, s in importance.METHODS.items() if not s.needs_data]
DATA_AWARE = [name for name, s in importance.METHODS.items() if s.needs_data]


def tiny_model(family: str) -> nn.Module:
    """A 2-layer random GPT-2 (MLP width 128) or Llama (MLP width 64) in eval mode."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config).eval()


def calibration(n_batches: int = 2) -> list[dict]:
    """Random token batches (2, 8) whose second row is right-padded after 5 tokens."""
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return [{"input_ids": torch.randint(0, 100, (2, 8), generator=generator), "attention_mask": mask}
            for _ in range(n_batches)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", list(importance.METHODS))
def test_every_method_scores_every_neuron(family, method):
    model = tiny_model(family)
    data = calibration() if importance.METHODS[method].needs_data else None
    scores = importance.score_model(model, method, data)
    assert sorted(scores) == [0, 1]
    for index, layer_scores in scores.items():
        assert layer_scores.shape == (arch.mlp_parts(model, index).width,)
        assert layer_scores.dtype == torch.float32
        assert torch.isfinite(layer_scores).all()
        assert (layer_scores >= 0).all()


@pytest.mark.parametrize("method", DATA_AWARE)
def test_data_aware_methods_need_calibration(method):
    model = tiny_model("llama")
    for missing in (None, []):
        with pytest.raises(ValueError, match="needs calibration data"):
            importance.score_model(model, method, missing)
    with pytest.raises(ValueError, match="activation statistics"):
        importance.score_layer(model, 0, method)


def test_unknown_method_lists_methods():
    with pytest.raises(ValueError, match="l1.*wanda_like"):
        importance.score_model(tiny_model("gpt2"), "taylor")


def test_unsupported_model_raises():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100))
    with pytest.raises(ValueError, match="unsupported architecture"):
        importance.score_model(model, "l1")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padding_does_not_change_data_aware_scores(family):
    model = tiny_model(family)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    plain = [{"input_ids": ids, "attention_mask": torch.ones(1, 6, dtype=torch.long)}]
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # (1, 10)
    padded_mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    padded = [{"input_ids": padded_ids, "attention_mask": padded_mask}]
    for method in DATA_AWARE:
        a, b = importance.score_model(model, method, plain), importance.score_model(model, method, padded)
        for index in a:
            torch.testing.assert_close(a[index], b[index], atol=1e-6, rtol=1e-5)


def test_flap_matches_hand_computation_from_raw_activations():
    model = tiny_model("llama")
    data = calibration()
    with hooks.capture_mlp_activations(model, keep=True) as tap:
        tap.run(model, data)
    activations = tap.cat(1)  # (n_real_tokens, width)
    assert activations.shape[0] == 2 * (8 + 5)
    down = arch.mlp_parts(model, 1).output.weight  # (hidden, width)
    expected = activations.var(0, correction=0) * down.pow(2).sum(0)
    torch.testing.assert_close(importance.score_model(model, "flap", data)[1], expected, atol=1e-6, rtol=1e-4)
    expected_wanda = activations.pow(2).mean(0).sqrt() * down.norm(dim=0)
    torch.testing.assert_close(importance.score_layer(model, 1, "wanda_like", tap.stats[1]), expected_wanda)


def glu_parts() -> arch.MLPParts:
    """A hand-made GLU layer: 3 neurons, hidden size 2."""
    gate, up, down = nn.Linear(2, 3, bias=False), nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0], [-4.0, 1.0]]))
        up.weight.copy_(torch.tensor([[0.5, -2.5], [-1.0, 0.0], [2.0, -2.0]]))
        down.weight.copy_(torch.ones(2, 3))
    return arch.MLPParts(kind="glu", inputs=[gate, up], output=down, width=3)


def test_hand_checked_glu_scores():
    parts = glu_parts()
    # l1: gate rows |1|+|-2|=3, 3, 5 plus up rows 3, 1, 4
    torch.testing.assert_close(importance.l1_norm(parts), torch.tensor([6.0, 4.0, 9.0]))
    # max_abs: max(gate 2, up 2.5)=2.5, max(3, 1)=3, max(4, 2)=4
    torch.testing.assert_close(importance.max_abs(parts), torch.tensor([2.5, 3.0, 4.0]))
    # max_plus_min: gate (1+2, 3+0, 1+4) plus up (0.5+2.5, 0+1, 2+2)
    torch.testing.assert_close(importance.max_plus_min(parts), torch.tensor([6.0, 4.0, 9.0]))
    # product_of_norms: ||gate row|| x ||up row||
    expected = torch.tensor([5.0, 9.0, 17.0]).sqrt() * torch.tensor([6.5, 1.0, 8.0]).sqrt()
    torch.testing.assert_close(importance.product_of_norms(parts), expected)


def test_gpt2_scores_read_conv1d_columns():
    model = tiny_model("gpt2")
    parts = arch.mlp_parts(model, 0)
    c_fc, c_proj = parts.inputs[0].weight, parts.output.weight  # (hidden, width), (width, hidden)
    torch.testing.assert_close(importance.score_layer(model, 0, "l1"), c_fc.abs().sum(0))
    torch.testing.assert_close(importance.score_layer(model, 0, "product_of_norms"),
                               c_fc.norm(dim=0) * c_proj.norm(dim=1))


def test_registry_entries_are_consistent():
    assert set(STATIC) == {"l1", "l2", "max_abs", "max_plus_min", "variance", "product_of_norms"}
    assert set(DATA_AWARE) == {"activation_norm", "flap", "wanda_like"}
    for name, scorer in importance.METHODS.items():
        assert scorer.name == name and scorer.description and scorer.fn.__doc__


def test_score_model_leaves_no_hooks_and_restores_training_mode():
    model = tiny_model("gpt2").train()
    importance.score_model(model, "activation_norm", calibration(1))
    assert model.training
    assert hooks.count_hooks(model) == 0
