"""Depth pruning on tiny random GPT-2 and Llama models: layer scores (importance.py) and drop_layers (surgery.py)."""

import pytest
import torch
from conftest import padded_batch, tiny_gpt2, tiny_llama, word_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

from course_utils import arch, hooks, importance, models, surgery

IDS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(4))


def three_layer(family: str) -> nn.Module:
    return tiny_gpt2() if family == "gpt2" else tiny_llama(num_hidden_layers=3)


def deep(family: str, n: int = 4) -> nn.Module:
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=n, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    return tiny_llama(num_hidden_layers=n)


@torch.no_grad()
def make_identity(model: nn.Module, index: int) -> None:
    """Zero what layer ``index`` writes to the residual stream (attention and MLP outputs): it becomes h -> h."""
    for proj in (arch.attention_parts(model, index).o, arch.mlp_parts(model, index).output):
        proj.weight.zero_()
        if getattr(proj, "bias", None) is not None:
            proj.bias.zero_()


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits


FAMILIES = ["gpt2", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_an_identity_layer_keeps_the_logits(family):
    model = deep(family)
    make_identity(model, 1)
    before = logits(model)
    surgery.drop_layers(model, [1])
    assert arch.num_layers(model) == 3
    assert getattr(model.config, arch.get_spec(model).n_layers_key) == 3
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_layers_renumbers_the_cache_slots_and_generation_agrees(family):
    model = deep(family)
    surgery.drop_layers(model, [0, 2])
    spec = arch.get_spec(model)
    assert [getattr(layer, spec.attn).layer_idx for layer in arch.decoder_layers(model)] == [0, 1]
    prompt = IDS[:1]
    with_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_layers_saves_and_reloads_with_plain_transformers(family, tmp_path):
    model = deep(family)
    surgery.drop_layers(model, [3])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not models.needs_custom_loader(reloaded.config)
    assert arch.num_layers(reloaded) == 3
    torch.testing.assert_close(logits(reloaded), logits(model))


def test_drop_layers_slices_per_layer_config_lists():
    model = tiny_llama(num_hidden_layers=4)
    model.config.layer_types = ["full_attention"] * 4
    surgery.drop_layers(model, [1])
    assert model.config.layer_types == ["full_attention"] * 3


def test_drop_layers_keeps_per_layer_mlp_widths_in_step(tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    surgery.remove_mlp_neurons(model, {0: torch.arange(32), 1: torch.arange(48), 2: torch.arange(64)})
    surgery.drop_layers(model, [1])
    assert model.config.intermediate_sizes == [32, 64]
    before = logits(model)
    models.save_pruned(model, word_tokenizer(), tmp_path)
    reloaded, _ = models.load_pruned(tmp_path)
    torch.testing.assert_close(logits(reloaded), before)


@pytest.mark.parametrize("indices, message", [
    ([5], "layer index"), ([-1], "layer index"), ([1, 1], "duplicates"), ([0, 1, 2, 3], "cannot remove all"),
    (["1"], "layer index"),
])
@pytest.mark.parametrize("family", FAMILIES)
def test_drop_layers_bad_input_leaves_the_model_intact(family, indices, message):
    model = deep(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        surgery.drop_layers(model, indices)
    assert arch.num_layers(model) == 4
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- layer scores ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_block_influence_is_zero_for_an_identity_layer(family):
    model = deep(family)
    make_identity(model, 2)
    scores = importance.block_influence(model, [padded_batch()])
    assert scores.shape == (4,)
    assert scores[2].abs() < 1e-6
    assert (scores[[0, 1, 3]] > 1e-4).all()
    assert hooks.count_hooks(model) == 0


def test_block_influence_ignores_padding():
    model = tiny_llama(num_hidden_layers=3)
    batch = padded_batch(batch=3, seq=10)
    rows = []
    for r in range(3):
        n = int(batch["attention_mask"][r].sum())
        rows.append({key: value[r:r + 1, :n] for key, value in batch.items()})
    torch.testing.assert_close(importance.block_influence(model, [batch]), importance.block_influence(model, rows),
                               atol=1e-5, rtol=1e-4)


def test_block_influence_with_skipped_layers_scores_them_zero():
    model = tiny_llama(num_hidden_layers=3)
    scores = importance.block_influence(model, [padded_batch()], skip=[1])
    assert scores[1] < 1e-6 and (scores[[0, 2]] > 1e-3).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_loss_is_zero_for_an_identity_layer_and_positive_elsewhere(family):
    model = deep(family)
    make_identity(model, 1)
    increase = importance.removal_loss(model, [padded_batch()])
    assert increase[1].abs() < 1e-5
    assert (increase[[0, 2, 3]].abs() > 1e-5).all()


def test_angular_distance_of_an_identity_layer_is_zero():
    model = tiny_llama(num_hidden_layers=4)
    make_identity(model, 3)
    one = importance.angular_distance(model, [padded_batch()], n_block=1)
    assert one.shape == (4,) and one[3] < 1e-3 and (one[:3] > 1e-3).all()
    assert importance.angular_distance(model, [padded_batch()], n_block=3).shape == (2,)
    with pytest.raises(ValueError, match="n_block"):
        importance.angular_distance(model, [padded_batch()], n_block=4)


@pytest.mark.parametrize("fn", [importance.block_influence, importance.removal_loss, importance.attention_importance])
def test_layer_scores_need_calibration(fn):
    with pytest.raises(ValueError, match="calibration"):
        fn(tiny_llama(), [])


def test_removal_loss_on_a_shortlist_scores_only_the_candidates():
    model = tiny_llama(num_hidden_layers=4)
    full = importance.removal_loss(model, [padded_batch()])
    short = importance.removal_loss(model, [padded_batch()], candidates=[1, 3], skip=[0])
    assert short[0] == 0 and torch.isinf(short[2])
    assert torch.isfinite(short[[1, 3]]).all() and torch.isfinite(full).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_loss_equals_full_forward_passes_with_the_layers_skipped(family):
    """The layer-to-layer stream gives what the definition says: a full forward pass with the layers skipped."""
    from course_utils import evaluation

    model = deep(family, n=5)
    batches = [padded_batch(seed=s, batch=3, seq=10) for s in range(2)]
    skip, candidates = {1}, [0, 2, 4]
    streamed = importance.removal_loss(model, batches, skip=skip, candidates=candidates)
    with hooks.skip_layers(model, skip):
        base = evaluation.calibration_loss(model, batches)
    for index in candidates:
        with hooks.skip_layers(model, skip | {index}):
            reference = evaluation.calibration_loss(model, batches) - base
        assert abs(streamed[index].item() - reference) < 1e-5, index
    assert streamed[1] == 0 and torch.isinf(streamed[3])
    assert hooks.count_hooks(model) == 0


def test_contiguous_runs():
    assert surgery.contiguous_runs([7, 3, 4]) == [(3, 4), (7, 7)]
    assert surgery.contiguous_runs([]) == []


@torch.no_grad()
def _block_error(model, kept_before, target_model, last, batch):
    """MSE between the new model's output of layer ``kept_before`` and the original's output of layer ``last``."""
    out_new = model(**batch, output_hidden_states=True).hidden_states[kept_before + 1]
    out_old = target_model(**batch, output_hidden_states=True).hidden_states[last + 1]
    real = batch["attention_mask"].bool()
    return (out_new[real] - out_old[real]).pow(2).mean().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_replacement_reduces_the_block_error_and_reloads(family, tmp_path):
    original = deep(family)
    batches = [padded_batch(seed=s, batch=4, seq=12) for s in range(4)]
    plain = surgery.drop_layers(deep(family), [1, 2])
    compensated = surgery.drop_layers(deep(family), [1, 2], calibration=batches)
    assert arch.num_layers(compensated) == 2
    err_plain = _block_error(plain, 0, original, 2, batches[0])
    err_comp = _block_error(compensated, 0, original, 2, batches[0])
    assert err_comp < err_plain
    compensated.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(compensated))


def test_linear_replacement_with_a_huge_ridge_is_a_plain_drop():
    batches = [padded_batch()]
    plain = surgery.drop_layers(deep("llama"), [2])
    stiff = surgery.drop_layers(deep("llama"), [2], calibration=batches, shrink_to_identity=1e9)
    torch.testing.assert_close(logits(stiff), logits(plain), atol=1e-4, rtol=1e-4)


def test_linear_replacement_skips_a_run_at_layer_zero_and_rejects_empty_calibration():
    model = deep("llama")
    assert surgery.linear_replacements(model, [(0, 1)], [padded_batch()]) == {}
    with pytest.raises(ValueError, match="needs calibration data"):
        surgery.drop_layers(model, [1], calibration=[])
    assert arch.num_layers(model) == 4


def test_greedy_layers_takes_identity_layers_first_and_returns_the_order_of_choice():
    model = deep("llama")
    make_identity(model, 2)
    order = importance.greedy_layers(model, importance.block_influence, 3, [padded_batch()])
    assert order[0] == 2 and len(set(order)) == 3
    assert importance.greedy_layers(model, importance.block_influence, 1, [padded_batch()]) == order[:1]
    shortlist = importance.greedy_layers(model, importance.removal_loss, 2, [padded_batch()], candidates=[1, 2])
    assert shortlist[0] == 2 and set(shortlist) == {1, 2}
    with pytest.raises(ValueError, match="k must be"):
        importance.greedy_layers(model, importance.block_influence, 4, [padded_batch()])


# ---- refitting the kept layers after a removal ---------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_refit_after_removal_beats_the_linear_replacement_and_reloads(family, tmp_path):
    original = deep(family)
    batches = [padded_batch(seed=s, batch=4, seq=12) for s in range(4)]
    replaced = surgery.drop_layers(deep(family), [1, 2], calibration=batches)
    refitted = surgery.drop_layers(deep(family), [1, 2], calibration=batches, refit=True)
    assert arch.num_layers(refitted) == 2
    # the layer before the run stands in for it, and the last layer tracks the original's last layer
    assert _block_error(refitted, 0, original, 2, batches[0]) < _block_error(replaced, 0, original, 2, batches[0])
    assert _block_error(refitted, 1, original, 3, batches[0]) < _block_error(replaced, 1, original, 3, batches[0])
    refitted.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(refitted))


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_after_dropping_an_identity_layer_keeps_the_logits(family):
    """Nothing changed in the stream, so the least-squares refit returns the weights it started from."""
    model = deep(family)
    make_identity(model, 2)
    before = logits(model)
    surgery.drop_layers(model, [2], calibration=[padded_batch(seed=s, batch=4, seq=12) for s in range(3)],
                        refit=True)
    torch.testing.assert_close(logits(model), before, atol=1e-4, rtol=1e-4)


def test_refit_needs_calibration_and_leaves_the_model_intact():
    model = deep("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="refit=True"):
        surgery.drop_layers(model, [1], refit=True)
    with pytest.raises(ValueError, match="layer index"):
        surgery.drop_layers(model, [7], calibration=[padded_batch()], refit=True)
    assert arch.num_layers(model) == 4 and model.config.mlp_bias is False
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
