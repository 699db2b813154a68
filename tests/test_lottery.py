"""The lottery-ticket helpers: reproducible data, masks that hold, rewinding that restores the initial weights."""

import pytest
import torch

from course_utils import lottery


def test_split_is_seeded_standardised_and_disjoint():
    x_train, y_train, x_test, y_test = lottery.digits_split(0)
    again = lottery.digits_split(0)
    assert torch.equal(x_train, again[0]) and len(x_test) == int(0.3 * 1797)
    assert x_train.mean(0).abs().max() < 1e-4  # standardised on the training split
    assert set(y_train.tolist()) == set(range(10))


def test_rounds_raise_sparsity_as_scheduled_and_survivors_restart_from_the_initial_weights():
    data = tuple(t[:300] for t in lottery.digits_split(0)[:2]) + tuple(t[:100] for t in lottery.digits_split(0)[2:])
    history = lottery.iterative_magnitude_pruning(0, rounds=3, data=data, epochs=1)
    sparsities = [s for s, _ in history]
    assert sparsities[0] == 0 and sparsities == sorted(sparsities)
    hidden_share = 1 - 0.8 ** 3  # each round removes 20 % of the surviving hidden weights
    model = lottery.make_mlp(0)
    total = sum(m.weight.numel() for m in lottery.linears(model))
    out = lottery.linears(model)[-1].weight.numel()
    expected = ((total - out) * hidden_share + out * (1 - 0.9 ** 3)) / total
    assert abs(sparsities[-1] - expected) < 0.01
    with pytest.raises(ValueError, match="rewind"):
        lottery.iterative_magnitude_pruning(0, 1, rewind="late", data=data)


def test_training_keeps_masked_weights_at_zero():
    from torch.nn.utils import prune

    data = lottery.digits_split(1)
    model = lottery.make_mlp(1)
    first = lottery.linears(model)[0]
    prune.l1_unstructured(first, "weight", amount=0.5)
    mask = first.weight_mask.bool().clone()
    accuracy = lottery.train(model, data, epochs=2)
    assert float(first.weight.detach()[~mask].abs().max()) == 0.0 and 0.5 < accuracy <= 1.0
