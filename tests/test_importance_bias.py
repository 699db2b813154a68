"""Choosing neurons for bias pruning: rank mixing, model-wide top-n, the random control, exact removal."""

import pytest
import torch
from conftest import padded_batch, tiny_llama

from course_utils import arch, importance, surgery


def test_hybrid_mixes_ranks_and_its_extremes_are_the_pure_scores():
    reaction = torch.tensor([[3.0, 1.0, 2.0], [10.0, 0.0, 5.0]])
    weight_score = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    pure_bias = importance.hybrid_scores(reaction, weight_score, weight=1.0)
    pure_structure = importance.hybrid_scores(reaction, weight_score, weight=0.0)
    assert torch.equal(pure_bias.flatten().argsort(), reaction.flatten().argsort())
    assert torch.equal(pure_structure.flatten().argsort(), (-weight_score).flatten().argsort())  # least important first
    assert float(pure_bias.min()) == 0.0 and float(pure_bias.max()) == 1.0
    with pytest.raises(ValueError, match="weight"):
        importance.hybrid_scores(reaction, weight_score, weight=1.5)
    with pytest.raises(ValueError, match="same"):
        importance.hybrid_scores(reaction, weight_score[:1], weight=0.5)


def test_top_neurons_and_the_random_control_have_the_same_per_layer_counts():
    scores = torch.zeros(3, 8)
    scores[0, 2], scores[2, 5], scores[2, 1] = 3.0, 2.0, 1.0
    chosen = importance.top_neurons(scores, 3)
    assert {k: v.tolist() for k, v in chosen.items()} == {0: [2], 2: [1, 5]}
    control = importance.random_like(chosen, width=8, seed=0)
    assert {k: len(v) for k, v in control.items()} == {0: 1, 2: 2}
    assert {k: v.tolist() for k, v in importance.random_like(chosen, 8, seed=0).items()} == \
        {k: v.tolist() for k, v in control.items()}  # seeded
    with pytest.raises(ValueError, match="n must be"):
        importance.top_neurons(scores, 0)


def test_removing_chosen_neurons_equals_silencing_them():
    model = tiny_llama().eval()
    width = arch.mlp_parts(model, 0).width
    removed = {0: torch.tensor([1, 5]), 1: torch.tensor([0, 2, 7])}
    batch = padded_batch()

    def silence(layer):
        def hook(module, args):
            x = args[0].clone()
            x[..., removed[layer]] = 0.0
            return (x,)
        return hook

    handles = [arch.mlp_parts(model, layer).output.register_forward_pre_hook(silence(layer)) for layer in removed]
    with torch.no_grad():
        silenced = model(**batch).logits
    for handle in handles:
        handle.remove()
    keep = importance.keep_after_removing(model, removed)
    assert [len(keep[0]), len(keep[1])] == [width - 2, width - 3]
    surgery.remove_mlp_neurons(model, keep)
    with torch.no_grad():
        pruned = model(**batch).logits
    assert torch.allclose(pruned, silenced, atol=1e-5)
    with pytest.raises(ValueError, match="neuron indices"):
        importance.keep_after_removing(model, {0: torch.tensor([width + 10])})


def test_stack_scores_needs_every_layer_and_one_width():
    model = tiny_llama()
    scores = importance.score_model(model, "l1")
    stacked = importance.stack_scores(model, scores)
    assert stacked.shape == (arch.num_layers(model), arch.mlp_parts(model, 0).width)
    with pytest.raises(ValueError, match="each of the"):
        importance.stack_scores(model, {0: scores[0]})
