"""The structure record and verified saves: every surgery round-trips on every family arch.py lists.

Families: GPT-2, Llama, and the Llama-like Qwen2, Qwen3 and Mistral (whose stock MLP has no bias flag,
so a refit's biases must be recorded, or a plain ``from_pretrained`` silently drops them).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import padded_batch, tiny_gpt2, tiny_llama, word_tokenizer
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from course_utils import arch, bypass, importance, models, structure, surgery

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
             max_position_embeddings=64)


def tiny(family: str, layers: int = 4, seed: int = 0):
    """A random model of ``family`` with ``layers`` decoder layers (hidden 32, MLP 64, GQA 4/2 heads)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        return _deeper_gpt2(layers, seed)
    if family == "llama":
        return tiny_llama(seed, num_hidden_layers=layers)
    config, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                   "mistral": (MistralConfig, MistralForCausalLM)}[family]
    extra = {"head_dim": 8} if family == "qwen3" else {}
    return cls(config(num_hidden_layers=layers, **SMALL, **extra)).eval()


def _deeper_gpt2(layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral"]


def batches(n: int = 3):
    return [padded_batch(seed=s, batch=4, seq=12) for s in range(n)]


def _stats(model):
    return importance.collect_stats(model, batches(), gram=True)


SURGERIES = {
    "width uniform": lambda m: surgery.prune_mlp(m, 0.25, method="l2"),
    "width per layer": lambda m: surgery.prune_mlp(m, 0.25, method="l2", protect=[0]),
    "width refit": lambda m: surgery.prune_mlp(m, 0.25, method="wanda_like", calibration=batches(), refit=True),
    "width obs, per layer": lambda m: surgery.prune_mlp(m, 0.25, method="obs", stats=_stats(m),
                                                        allocation={0: 0.0, 1: 0.5, 2: 0.25, 3: 0.25}),
    "width obs_sequential": lambda m: surgery.prune_mlp(m, 0.25, method="obs_sequential", calibration=batches()),
    "depth plain": lambda m: surgery.drop_layers(m, [1]),
    "depth replacement": lambda m: surgery.drop_layers(m, [1, 2], calibration=batches()),
    "depth refit": lambda m: surgery.drop_layers(m, [2], calibration=batches(), refit=True),
    "bypass": lambda m: bypass.bypass_attention(m, [1, 3]),
    "width refit, then depth, then bypass": lambda m: bypass.bypass_attention(
        surgery.drop_layers(surgery.remove_mlp_neurons(m, {0: torch.arange(40)}, refit=_stats(m)), [3]), [0]),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(SURGERIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_surgery_round_trips_on_every_family(family, name, tmp_path):
    model = tiny(family)
    SURGERIES[name](model)
    ids = padded_batch(seed=7, batch=2, seq=9)["input_ids"]
    path = models.save_pruned(model, word_tokenizer(), tmp_path / "saved")  # verifies, or raises
    reloaded, _ = models.load_pruned(path)
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    custom = structure.needs_custom_loader(reloaded.config)
    assert ("Load with `course_utils.models.load_pruned" in (path / "README.md").read_text()) == custom
    if not custom:  # the card says stock from_pretrained: it must give the same model, not a near miss
        stock = AutoModelForCausalLM.from_pretrained(path).eval()
        assert torch.equal(_logits(model, ids), _logits(stock, ids))


@pytest.mark.parametrize("family,custom", [("llama", False), ("qwen2", True), ("qwen3", True), ("mistral", True)])
def test_refit_biases_are_stock_on_llama_and_recorded_elsewhere(family, custom):
    model = tiny(family)
    surgery.prune_mlp(model, 0.25, method="wanda_like", calibration=batches(), refit=True)
    assert structure.has_mlp_bias(model)
    assert structure.needs_custom_loader(model.config) == custom
    assert getattr(model.config, "mlp_biases", None) == (True if custom else None)
    if not custom:
        assert model.config.mlp_bias is True


def test_save_refuses_a_copy_that_reloads_differently(tmp_path, monkeypatch):
    """With the MLP-bias record switched off, a Qwen2 refit would lose its biases: the save must say so."""
    model = tiny("qwen2")
    surgery.prune_mlp(model, 0.25, method="wanda_like", calibration=batches(), refit=True)
    monkeypatch.delitem(structure.REGISTRY, "mlp_biases")
    if hasattr(model.config, "mlp_biases"):
        del model.config.mlp_biases
    target = tmp_path / "saved"
    with pytest.raises(ValueError, match="computes different logits"):
        models.save_pruned(model, word_tokenizer(), target)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no half-written directory left behind


def test_save_replaces_an_earlier_save_but_not_other_folders(tmp_path):
    model = tiny("llama")
    models.save_pruned(model, word_tokenizer(), tmp_path / "m")
    surgery.drop_layers(model, [0])
    models.save_pruned(model, word_tokenizer(), tmp_path / "m")
    assert models.load_pruned(tmp_path / "m")[0].config.num_hidden_layers == 3
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no saved model"):
        models.save_pruned(model, word_tokenizer(), tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_every_edit_is_reported_with_its_loader():
    model = tiny("llama")
    before = models.count_parameters(model)
    surgery.prune_mlp(model, 0.25, method="l2", protect=[0])
    surgery.drop_layers(model, [3])
    edits = structure.history(model)
    assert [e.edit for e in edits] == ["prune_mlp", "drop_layers"]
    assert edits[0].params_before == before and edits[1].params_after == models.count_parameters(model)
    assert edits[0].loader == structure.CUSTOM_LOADER  # per-layer widths
    assert "layers [3] removed" in str(edits[1])
    assert structure.history(copy.deepcopy(model))[-1].edit == "drop_layers"


@pytest.mark.parametrize("edit", [
    lambda m, b: surgery.prune_mlp(m, 0.25, method="wanda_like", calibration=b),
    lambda m, b: surgery.prune_mlp(m, 0.25, method="obs_sequential", calibration=b),
    lambda m, b: surgery.drop_layers(m, [1], calibration=b, refit=True),
    lambda m, b: surgery.drop_layers(m, [1], calibration=b),
    lambda m, b: bypass.choose_bypass(m, b, 1),
    lambda m, b: importance.block_influence(m, b),
])
@pytest.mark.parametrize("problem", ["foreign vocabulary", "empty row", "empty list", "one dict"])
def test_bad_calibration_is_refused_before_any_change(edit, problem):
    model = tiny("llama")
    state = copy.deepcopy(model.state_dict())
    good = batches()
    bad = {"foreign vocabulary": [padded_batch(vocab=500, seq=12)],
           "empty row": [{"input_ids": good[0]["input_ids"], "attention_mask": torch.zeros_like(good[0]["input_ids"])}],
           "empty list": [], "one dict": good[0]}[problem]
    message = {"foreign vocabulary": "another model's tokenizer", "empty row": "all zeros",
               "empty list": "needs calibration data", "one dict": "wrap it in a list"}[problem]
    with pytest.raises(ValueError, match=message):
        edit(model, bad)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.config.num_hidden_layers == 4 and not structure.history(model)


def test_method_splits_into_score_and_selection():
    a, b = tiny("llama"), tiny("llama")
    stats = _stats(a)
    surgery.prune_mlp(a, 0.25, method="obs", stats=stats)
    surgery.prune_mlp(b, 0.25, selection="obs", stats=stats)
    ids = padded_batch()["input_ids"]
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    with pytest.raises(ValueError, match="always refits"):
        surgery.prune_mlp(tiny("llama"), 0.25, selection="obs", stats=stats, refit=False)
    with pytest.raises(ValueError, match="not both"):
        surgery.prune_mlp(tiny("llama"), 0.25, method="l1", score="l2")
    with pytest.raises(ValueError, match="selection must be one of"):
        surgery.prune_mlp(tiny("llama"), 0.25, selection="best")


def test_gqa_groups():
    parts = arch.attention_parts(tiny("qwen2"), 0)
    assert parts.group_size == 2 and parts.groups() == [[0, 1], [2, 3]]
    gpt2 = arch.attention_parts(tiny_gpt2(), 0)
    assert gpt2.group_size == 1 and gpt2.groups() == [[0], [1]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sliced_weights_are_stored_contiguous(family):
    """A transposed view would compute in another order than the saved copy: reloads would differ in the last bits."""
    model = tiny(family)
    surgery.prune_mlp(model, 0.3, method="l1")
    assert all(p.is_contiguous() for p in model.parameters())
