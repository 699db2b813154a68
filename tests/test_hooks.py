"""Hooks capture the right shapes, exclude padding and never stay behind."""

import pytest
import torch
from conftest import padded_batch

from course_utils import hooks


def _run(model, batch):
    with torch.no_grad():
        model(**batch)


def test_layer_io_shapes(tiny_model):
    batch = padded_batch()
    n_real = int(batch["attention_mask"].sum())
    with hooks.capture_layer_io(tiny_model, keep=True) as tap:
        tap.run(tiny_model, [batch])
    for index in (0, 1):
        inputs, outputs = tap.cat(index)
        assert inputs.shape == outputs.shape == (n_real, 32)
        assert not torch.allclose(inputs, outputs)
    # layer 1's input is layer 0's output
    assert torch.allclose(tap.cat(1)[0], tap.cat(0)[1])
    assert hooks.count_hooks(tiny_model) == 0


def test_mlp_activation_width(tiny_model):
    width = 128 if tiny_model.config.model_type == "gpt2" else 64
    with hooks.capture_mlp_activations(tiny_model, layers=[1]) as tap:
        tap.run(tiny_model, [padded_batch()])
    assert list(tap.stats) == [1]
    assert tap.stats[1].mean_abs.shape == (width,)
    assert tap.stats[1].count == int(padded_batch()["attention_mask"].sum())


def test_attention_outputs(tiny_model):
    with hooks.capture_attention_outputs(tiny_model, keep=True) as tap:
        tap.run(tiny_model, [padded_batch()])
    assert tap.cat(0).shape == (int(padded_batch()["attention_mask"].sum()), 32)


def test_padding_excluded_from_statistics(tiny_model):
    """Statistics over a padded batch equal those over the same real tokens without padding."""
    padded = padded_batch()
    with hooks.capture_mlp_activations(tiny_model) as tap_padded:
        tap_padded.run(tiny_model, [padded])
    with hooks.capture_mlp_activations(tiny_model) as tap_rows:  # each row alone, unpadded
        for row in range(3):
            n = int(padded["attention_mask"][row].sum())
            tap_rows.run(tiny_model, [{"input_ids": padded["input_ids"][row:row + 1, :n],
                                       "attention_mask": padded["attention_mask"][row:row + 1, :n]}])
    for index in (0, 1):
        a, b = tap_padded.stats[index], tap_rows.stats[index]
        assert a.count == b.count
        torch.testing.assert_close(a.mean, b.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.max, b.max, atol=1e-5, rtol=1e-4)
    # and padding would change them if it were counted
    with hooks.capture_mlp_activations(tiny_model) as tap_all:
        tap_all.set_mask(None)
        _run(tiny_model, {"input_ids": padded["input_ids"]})
    assert tap_all.stats[0].count > tap_padded.stats[0].count


def test_hooks_removed_when_body_raises(tiny_model):
    for capture in (hooks.capture_layer_io, hooks.capture_mlp_activations, hooks.capture_attention_outputs):
        with pytest.raises(RuntimeError, match="boom"):
            with capture(tiny_model):
                assert hooks.count_hooks(tiny_model) > 0
                raise RuntimeError("boom")
        assert hooks.count_hooks(tiny_model) == 0


def test_mismatched_mask_is_an_error(tiny_model):
    with hooks.capture_mlp_activations(tiny_model) as tap:
        tap.set_mask(torch.ones(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="does not match"):
            _run(tiny_model, {"input_ids": torch.ones(2, 5, dtype=torch.long)})
    assert hooks.count_hooks(tiny_model) == 0


def test_callback_receives_token_blocks(tiny_model):
    seen = []
    with hooks.capture_layer_io(tiny_model, layers=[0], fn=lambda i, x, y: seen.append((i, x.shape, y.shape))):
        _run(tiny_model, {"input_ids": torch.ones(2, 4, dtype=torch.long)})
    assert seen == [(0, (8, 32), (8, 32))]


def test_bad_layer_index(tiny_model):
    with pytest.raises(ValueError, match="layer index"):
        with hooks.capture_layer_io(tiny_model, layers=[5]):
            pass


def test_gram_matches_float64_brute_force():
    """Blocks multiplied in float32 and summed in float64 stay within float32 rounding of the exact Gram."""
    torch.manual_seed(0)
    blocks = [torch.randn(500, 96) * (1 + torch.arange(96) / 10) + 0.5 for _ in range(6)]
    stats = hooks.TokenStats(track_gram=True)
    for block in blocks:
        stats.update(block)
    exact = sum(b.double().T @ b.double() for b in blocks)
    assert stats.gram.dtype == torch.float64 and stats.count == 3000
    assert torch.allclose(stats.gram, exact, rtol=1e-5, atol=1e-3 * float(exact.diagonal().mean()) * 1e-3)
    assert torch.allclose(stats.second_moment, exact / 3000, rtol=1e-5, atol=1e-3)


def test_feed_gives_the_hooks_what_a_full_forward_gives(tiny_model):
    """hooks.feed skips the LM head on all but the last position; every tapped activation is unchanged."""
    batch = padded_batch()
    with hooks.capture_layer_io(tiny_model, keep=True) as fed:
        fed.run(tiny_model, [batch])
    with hooks.capture_mlp_activations(tiny_model, gram=True) as fed_mlp:
        fed_mlp.run(tiny_model, [batch])
    with hooks.capture_layer_io(tiny_model, keep=True) as full, \
            hooks.capture_mlp_activations(tiny_model, gram=True) as full_mlp, torch.no_grad():
        full.set_mask(batch["attention_mask"])
        full_mlp.set_mask(batch["attention_mask"])
        logits = tiny_model(**batch).logits
    assert logits.shape[1] == batch["input_ids"].shape[1]  # the reference pass did run the head everywhere
    for i in full.raw:
        for a, b in zip(fed.raw[i][0], full.raw[i][0], strict=True):
            assert torch.equal(a, b)
    for i in full_mlp.stats:
        assert torch.equal(fed_mlp.stats[i].gram, full_mlp.stats[i].gram)
        assert fed_mlp.stats[i].count == full_mlp.stats[i].count == int(batch["attention_mask"].sum())
