"""Contrastive-pair measurements: zero for identical prompts, symmetric, padding-free, aligned."""

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from course_utils import bias, hooks


def _pairs(seed: int = 0, n: int = 5, vocab: int = 100):
    """Prompts that differ in a 'term' of one or two tokens between a shared prefix and suffix."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, vocab, (k,), generator=g).tolist()  # noqa: E731
    pairs = []
    for i in range(n):
        prefix, suffix = rand(2 + i % 3), rand(3 + i % 2)
        pairs.append((prefix + rand(1) + suffix, prefix + rand(1 + i % 2) + suffix))
    return pairs


def test_aligned_positions_cover_the_shared_suffix():
    a, b = [5, 6, 7, 8, 9], [5, 6, 1, 2, 8, 9]
    assert bias.aligned_positions(a, b) == ([3, 4], [4, 5])
    assert bias.aligned_positions([1, 2, 3], [1, 2, 4]) == ([2], [2])  # the term ends the prompt: last token
    assert bias.aligned_positions([1, 2], [1, 2]) == ([0, 1], [0, 1])
    with pytest.raises(ValueError, match="no tokens"):
        bias.aligned_positions([], [1])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_identical_prompts_measure_zero(make):
    model = make().eval()
    same = [(a, list(a)) for a, _ in _pairs()]
    acts = bias.pair_activations(model, same)
    assert torch.equal(acts.a, acts.b)
    assert float(bias.internal_bias(acts).abs().max()) == 0.0
    assert float(bias.activation_differences(acts).max()) == 0.0
    assert float(bias.next_token_shift(model, same).max()) < 1e-6


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_metrics_are_symmetric_in_pair_order(make):
    model = make().eval()
    pairs = _pairs()
    swapped = [(b, a) for a, b in pairs]
    forward, backward = bias.pair_activations(model, pairs), bias.pair_activations(model, swapped)
    assert torch.allclose(bias.internal_bias(forward), bias.internal_bias(backward))
    assert torch.allclose(bias.activation_differences(forward), bias.activation_differences(backward))
    assert torch.allclose(bias.next_token_shift(model, pairs), bias.next_token_shift(model, swapped), atol=1e-6)
    assert float(bias.internal_bias(forward).min()) > 0  # different terms do change the activations


def test_padding_does_not_change_the_numbers():
    model = tiny_llama().eval()
    pairs = _pairs(n=6)
    batched = bias.pair_activations(model, pairs, batch_size=12)  # prompts of several lengths, right-padded
    alone = bias.pair_activations(model, pairs, batch_size=1)  # no padding at all
    assert torch.allclose(batched.a, alone.a, atol=1e-5) and torch.allclose(batched.b, alone.b, atol=1e-5)
    assert torch.allclose(bias.next_token_shift(model, pairs, batch_size=12),
                          bias.next_token_shift(model, pairs, batch_size=1), atol=1e-6)


def test_activations_average_the_aligned_positions_of_each_prompt():
    model = tiny_llama().eval()
    a, b = _pairs(n=1)[0]
    acts = bias.pair_activations(model, [(a, b)], layers=[1])
    pos_a, pos_b = bias.aligned_positions(a, b)
    for ids, pos, got in ((a, pos_a, acts.a), (b, pos_b, acts.b)):
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        with hooks.capture_mlp_activations(model, layers=[1], keep=True) as tap:
            tap.run(model, [batch])
        assert torch.allclose(got[0, 0], tap.cat(1)[pos].mean(0), atol=1e-6)


def test_bad_input_is_refused():
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="no pairs"):
        bias.pair_activations(model, [])
    with pytest.raises(ValueError, match="vocabulary"):
        bias.pair_activations(model, [([1, 2, 10_000], [1, 3, 4])])


def test_every_shipped_pair_aligns_on_smollm2(smollm2):
    """No pair is dropped: each aligns on the shared text after its terms (equal lengths or not)."""
    from course_utils import bias_pairs

    model, tokenizer = smollm2
    rows = bias_pairs.load()
    encoded = bias.encode_pairs(tokenizer, rows)
    unequal = 0
    for row, (a, b) in zip(rows, encoded, strict=True):
        pos_a, pos_b = bias.aligned_positions(a, b)
        unequal += len(a) != len(b)
        assert len(pos_a) == len(pos_b) >= 1
        assert [a[p] for p in pos_a] == [b[p] for p in pos_b], row["id"]  # the same tokens after the term
        suffix = row["frame"].split("{who}")[1]
        if suffix.strip():
            assert tokenizer.decode([a[p] for p in pos_a]).strip().endswith(suffix.strip().split()[-1])
    # On SmolLM2's tokenizer every shipped pair happens to have equal lengths; other tokenizers need the alignment
    assert unequal == 0
    acts = bias.pair_activations(model, encoded[:8], layers=[0, 15])
    assert acts.a.shape == (2, 8, 1536) and float(bias.internal_bias(acts).min()) > 0


def test_one_pass_gives_what_the_separate_measurements_give():
    model = tiny_llama().eval()
    pairs = _pairs(n=4)
    acts, shift = bias.measure_pairs(model, pairs, batch_size=3)
    alone = bias.pair_activations(model, pairs, batch_size=1)
    assert torch.allclose(acts.a, alone.a, atol=1e-5) and torch.allclose(acts.b, alone.b, atol=1e-5)
    assert torch.allclose(shift, bias.next_token_shift(model, pairs, batch_size=1), atol=1e-6)
    some = acts.subset([1, 3])
    assert torch.equal(some.a, acts.a[:, [1, 3]]) and torch.equal(some.b, acts.b[:, [1, 3]])


def test_specific_reaction_is_the_demographic_minus_the_control_reaction_over_scale():
    model = tiny_llama().eval()
    acts = bias.pair_activations(model, _pairs(n=6))
    rows = [{"category": c} for c in ("gender", "control", "age", "control", "gender", "control")]
    demographic = acts.subset(bias.category_index(rows, ["gender", "age"]))
    control = acts.subset(bias.category_index(rows, "control"))
    expected = (bias.activation_differences(demographic) - bias.activation_differences(control)) / (acts.scale + 1e-6)
    assert torch.allclose(bias.specific_reaction(demographic, control), expected, atol=1e-6)
    assert float(bias.specific_reaction(control, control).abs().max()) == 0.0  # no reaction beyond the control
    with pytest.raises(ValueError, match="different layers"):
        bias.specific_reaction(demographic, bias.pair_activations(model, _pairs(n=2), layers=[0]))


@pytest.mark.parametrize("site, capture", [("residual", hooks.capture_layer_io),
                                           ("attention", hooks.capture_attention_outputs)])
def test_each_site_measures_what_its_hook_captures(site, capture):
    """residual: each layer's output hidden state; attention: what each attention sub-layer adds."""
    model = tiny_llama().eval()
    a, b = _pairs(n=1)[0]
    acts, _ = bias.measure_pairs(model, [(a, b)], layers=[1], site=site)
    pos_a, _ = bias.aligned_positions(a, b)
    batch = {"input_ids": torch.tensor([a]), "attention_mask": torch.ones(1, len(a), dtype=torch.long)}
    with capture(model, layers=[1], keep=True) as tap:
        tap.run(model, [batch])
    kept = tap.cat(1)
    kept = kept[1] if isinstance(kept, tuple) else kept  # layer taps keep (inputs, outputs)
    assert torch.allclose(acts.a[0, 0], kept[pos_a].mean(0), atol=1e-6)
    assert acts.a.shape[-1] == model.config.hidden_size


def test_unknown_site_is_refused():
    with pytest.raises(ValueError, match="site must be"):
        bias.measure_pairs(tiny_llama().eval(), _pairs(n=1), site="embedding")


def _continuation_items(seed: int = 1, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, 100, (k,), generator=g).tolist()  # noqa: E731
    return [(a, b, rand(2 + i % 2), rand(1 + i % 3)) for i, (a, b) in enumerate(_pairs(seed, n))]


def test_continuation_logprob_is_the_sum_over_the_continuation_tokens():
    model = tiny_llama().eval()
    context, continuation = [5, 6, 7], [8, 9]
    with torch.no_grad():
        log_p = torch.log_softmax(model(torch.tensor([context + continuation])).logits[0].float(), -1)
    expected = log_p[2, 8] + log_p[3, 9]  # position i predicts token i + 1
    got = bias.continuation_logprob(model, [(context, continuation), ([1, 2, 3, 4, 5, 6], [7])])
    assert torch.allclose(got[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        bias.continuation_logprob(model, [([1, 2], [])])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_stereotype_preference_is_zero_for_identical_prompts_symmetric_and_padding_free(make):
    model = make().eval()
    items = _continuation_items()
    same = [(a, list(a), sa, sb) for a, _, sa, sb in items]
    assert float(bias.stereotype_preference(model, same).abs().max()) < 1e-5
    forward = bias.stereotype_preference(model, items, batch_size=16)
    swapped = bias.stereotype_preference(model, [(b, a, sb, sa) for a, b, sa, sb in items], batch_size=16)
    alone = bias.stereotype_preference(model, items, batch_size=1)  # no padding at all
    assert torch.allclose(forward, swapped, atol=1e-5) and torch.allclose(forward, alone, atol=1e-4)
    assert float(forward.abs().min()) > 0  # different prompts and continuations do score differently


def test_encode_continuations_uses_only_pairs_that_have_them(smollm2):
    from course_utils import bias_pairs

    model, tokenizer = smollm2
    held_out = bias_pairs.load("held_out")
    encoded = bias.encode_continuations(tokenizer, held_out)
    assert len(encoded) == sum("continuations" in row for row in held_out) == 64
    with pytest.raises(ValueError, match="no pair has continuations"):
        bias.encode_continuations(tokenizer, bias_pairs.load("selection"))
    scores = bias.stereotype_preference(model, encoded[:4])
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())


def test_logits_at_kept_positions_equal_the_full_computation():
    """measure_pairs and continuation_logprob project only the positions they use; the numbers stay the same."""
    model = tiny_llama().eval()
    items = [(a, sa) for a, _, sa, _ in _continuation_items(n=5)]
    got = bias.continuation_logprob(model, items, batch_size=3)
    with torch.no_grad():
        for (context, continuation), value in zip(items, got, strict=True):
            log_p = torch.log_softmax(model(torch.tensor([context + continuation])).logits[0].float(), -1)
            expected = sum(log_p[len(context) - 1 + k, t] for k, t in enumerate(continuation))
            assert torch.allclose(value, expected, atol=1e-5)
