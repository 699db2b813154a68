"""Head pruning under GQA: removing heads equals silencing them, bad requests change nothing, saves reload."""

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM

from course_utils import arch, bypass, heads, importance, models, structure


def _gqa(seed: int = 0):
    """6 query heads in 3 K/V groups of 2 (SmolLM2's layout is 9 in 3 groups of 3)."""
    return tiny_llama(seed, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)


def _silenced(model, removed):
    """The model with each removed query head's output columns of W_o zeroed: what removal must equal."""
    silent = copy.deepcopy(model)
    for index, hs in removed.items():
        parts = arch.attention_parts(silent, index)
        with torch.no_grad():
            for h in hs:
                parts.o.weight[:, h * parts.head_dim:(h + 1) * parts.head_dim] = 0
    return silent


IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("removed", [
    {0: [2, 3], 1: [2, 3]},  # K/V group 1 in both layers: uniform, the K/V head goes too
    {0: [0, 2, 4]},  # one query head from each group of layer 0
    {0: [0, 1, 3, 5], 1: [4, 5]},  # layer 0: group 0 whole plus one of each other group; layer 1: group 2
])
def test_removing_heads_equals_silencing_them(removed):
    model = _gqa()
    expected = _silenced(model, removed)(IDS).logits
    heads.remove_heads(model, removed)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, expected, atol=1e-5)
    for index, hs in removed.items():
        n_q, n_kv = heads.head_counts(model)[index]
        assert n_q == 6 - len(hs) and n_q % n_kv == 0


def test_bert_style_slicing_re_pairs_query_and_kv_heads():
    """Dropping query heads 0-2 by index, keeping every K/V head: it runs, and the wrong K/V heads are read."""
    from course_utils import projections

    model = _gqa()
    naive = copy.deepcopy(model)
    parts = arch.attention_parts(naive, 0)
    rows = torch.arange(3 * parts.head_dim, 6 * parts.head_dim)  # query heads 3, 4, 5 stay
    parts.module.q_proj = projections.sliced(parts.q, rows, dim="out")
    parts.module.o_proj = projections.sliced(parts.o, rows, dim="in")
    parts.module.num_key_value_groups = 3 // 3  # repeat_kv now pairs heads 3, 4, 5 with K/V 0, 1, 2 (not 1, 2, 2)
    with torch.no_grad():
        wrong = naive(IDS).logits
        right = _silenced(model, {0: [0, 1, 2]})(IDS).logits
    assert (wrong - right).abs().max() > 1e-3
    with pytest.raises(ValueError, match="same number"):  # the GQA-aware surgery refuses this request
        heads.remove_heads(model, {0: [0, 1, 2]})


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty"),
    ({5: [0]}, "layer"),
    ({0: [0, 0]}, "duplicates"),
    ({0: [6]}, r"\[0, 5\]"),
    ({0: [0]}, "same number"),
    ({0: [0, 1, 2, 3, 4, 5]}, "bypass the sub-layer"),
    ({0: [0, 2, 4], 1: [1]}, "same number"),  # layer 0 is fine, layer 1 is not: nothing may change
])
def test_bad_requests_leave_the_model_bit_identical(bad, match):
    model = _gqa()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        heads.remove_heads(model, bad)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert structure.history(model) == []


def test_gpt2_and_bypassed_layers_are_refused():
    with pytest.raises(ValueError, match="fuses"):
        heads.remove_heads(tiny_gpt2(), {0: [0]})
    model = bypass.bypass_attention(_gqa(), [1])
    with pytest.raises(ValueError, match="bypassed"):
        heads.remove_heads(model, {1: [0, 1]})


def test_group_heads_lists_the_query_heads_of_each_group():
    model = _gqa()
    assert heads.group_heads(model, {0: [1], 1: [0, 2]}) == {0: [2, 3], 1: [0, 1, 4, 5]}
    with pytest.raises(ValueError, match="do not exist"):
        heads.group_heads(model, {0: [3]})


def test_uniform_removal_reloads_with_stock_from_pretrained(tmp_path):
    model = _gqa()
    heads.remove_heads(model, heads.group_heads(model, {0: [2], 1: [0]}))
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert model.config.head_dim == 8 and not structure.needs_custom_loader(model.config)
    path = models.save_pruned(model, word_tokenizer(), tmp_path / "heads")
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, model(IDS).logits)
    assert heads.kv_cache_values_per_token(model) == 2 * 2 * 2 * 8  # 2 layers x K and V x 2 heads x 8
    out = plain.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)  # the KV cache works at the new sizes
    assert out.shape == (1, 7)


def test_per_layer_counts_reload_with_load_pruned_and_chain_with_other_edits(tmp_path):
    model = _gqa()
    heads.remove_heads(model, {0: [0, 2, 4]})  # layer 0: 3 query heads in 3 groups; layer 1 untouched
    assert structure.needs_custom_loader(model.config)
    assert model.config.attention_heads == [[3, 3], [6, 3]]
    bypass.bypass_attention(model, [1])
    importance_free = copy.deepcopy(model)
    path = models.save_pruned(model, word_tokenizer(), tmp_path / "mixed")
    reloaded, _ = models.load_pruned(path)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, importance_free(IDS).logits)
    assert heads.head_counts(reloaded) == {0: (3, 3)} and bypass.bypassed_layers(reloaded) == [1]


def _calibration():
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # the second row is padded
    return [{"input_ids": ids, "attention_mask": mask}]


@pytest.mark.parametrize("score", ["weight_norm", "output_norm", "taylor"])
def test_head_scores_have_one_number_per_query_head_and_ignore_padding(score):
    model = _gqa()
    batches = _calibration()
    scores = importance.head_scores(model, score, batches)
    assert scores.shape == (2, 6) and bool((scores >= 0).all()) and float(scores.sum()) > 0
    if score != "weight_norm":  # changing padded tokens changes nothing
        other = [{**batches[0], "input_ids": batches[0]["input_ids"].clone()}]
        other[0]["input_ids"][1, 8:] = 7
        assert torch.allclose(importance.head_scores(model, score, other), scores, atol=1e-6)


def test_taylor_is_the_per_sequence_gate_gradient_by_finite_differences():
    """head_scores("taylor") = sum over sequences of |dL/d g| for a gate g on one head's output in one sequence,
    checked against central differences of the batch loss in float64; no weight is left with a .grad."""
    model = _gqa().double()
    batches = _calibration()
    scores = importance.head_scores(model, "taylor", batches)
    batch = batches[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    parts = arch.attention_parts(model, 0)
    eps = 1e-3  # Llama's RMSNorm computes in float32 even in a float64 model: smaller steps drown in rounding

    def loss_with(layer, sequence, head, scale, width=1):  # width heads from `head` on scaled together
        def scale_head(module, args):
            x = args[0].clone()
            x[sequence, :, head * parts.head_dim:(head + width) * parts.head_dim] *= scale
            return (x,)
        handle = arch.attention_parts(model, layer).o.register_forward_pre_hook(scale_head)
        try:
            with torch.no_grad():  # the loss in float64 (the model's own loss upcasts to float32 only)
                logits = model(**batch, use_cache=False).logits[:, :-1]
                return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                               labels[:, 1:].reshape(-1), ignore_index=-100))
        finally:
            handle.remove()

    for layer in range(2):
        for head in range(parts.n_heads):
            brute = sum(abs(loss_with(layer, b, head, 1 + eps) - loss_with(layer, b, head, 1 - eps)) / (2 * eps)
                        for b in range(2))
            assert abs(float(scores[layer, head]) - brute) < 1e-3 * brute + 1e-7
    # per K/V group: one gate on the group's heads, |its gradient| per sequence (not the sum of its heads' scores)
    grouped = importance.head_scores(model, "taylor", batches, per="group")
    size = parts.group_size
    assert grouped.shape == (2, parts.n_kv_heads)
    for layer in range(2):
        for group in range(parts.n_kv_heads):
            brute = sum(abs(loss_with(layer, b, group * size, 1 + eps, size)
                            - loss_with(layer, b, group * size, 1 - eps, size)) / (2 * eps) for b in range(2))
            assert abs(float(grouped[layer, group]) - brute) < 1e-3 * brute + 1e-7
    assert all(p.grad is None for p in model.parameters())


def test_a_silent_head_scores_zero_on_data_aware_scores():
    model = _silenced(_gqa(), {0: [3]})
    for score in ("output_norm", "taylor"):
        assert float(importance.head_scores(model, score, _calibration())[0, 3]) == 0.0


def test_group_scores_sum_their_query_heads():
    model = _gqa()
    per_head = importance.head_scores(model, "weight_norm")
    grouped = importance.group_scores(model, per_head)
    assert grouped.shape == (2, 3) and torch.allclose(grouped[:, 1], per_head[:, 2] + per_head[:, 3])
    for score in ("weight_norm", "output_norm"):  # additive scores: per="group" is the sum of the heads
        torch.testing.assert_close(importance.head_scores(model, score, _calibration(), per="group"),
                                   importance.group_scores(model, importance.head_scores(model, score, _calibration())))
    with pytest.raises(ValueError, match="per must be"):
        importance.head_scores(model, "weight_norm", per="layer")


def test_lowest_groups_never_empties_a_layer_and_random_follows_the_same_rule():
    model = _gqa()
    grouped = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.05, 0.4]])
    assert importance.lowest_groups(model, grouped, 3) == {0: [0, 1], 1: [1]}  # layer 0's third group stays
    assert importance.lowest_groups(model, grouped, 4) == {0: [0, 1], 1: [1, 2]}
    with pytest.raises(ValueError, match="n must be"):
        importance.lowest_groups(model, grouped, 5)
    drawn = importance.random_groups(model, 3, seed=0)
    assert sum(len(v) for v in drawn.values()) == 3 and all(len(v) <= 2 for v in drawn.values())
    assert drawn == importance.random_groups(model, 3, seed=0)  # reproducible
    heads.remove_heads(model, heads.group_heads(model, drawn))  # always a valid request
