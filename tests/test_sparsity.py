"""Unstructured and N:M sparsity: exact shares, masks that survive training, Wanda and SparseGPT as specified."""

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from course_utils import sparsity


def _calibration(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, 12:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def _real_inputs(model, name, batch):
    """(the projection called ``name``, its inputs on the real tokens of ``batch``)."""
    captured = []
    module = sparsity.linear_layers(model)[name]
    handle = module.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return module, captured[0][batch["attention_mask"].bool()]


def test_masks_remove_the_requested_share_where_asked():
    model = tiny_llama()
    scores = sparsity.magnitude_scores(model)
    for scope in ("row", "layer"):
        masks = sparsity.masks_from_scores(scores, 0.5, scope)
        for name, mask in masks.items():
            assert mask.shape == scores[name].shape
            if scope == "row":
                assert bool((mask.sum(1) == mask.shape[1] - int(0.5 * mask.shape[1])).all())
            else:
                assert int((~mask).sum()) == int(0.5 * mask.numel())
            assert float(scores[name][~mask].max()) <= float(scores[name][mask].min()) or scope == "row"
    masks = sparsity.masks_from_scores(scores, 0.5, "global")
    removed = sum(int((~m).sum()) for m in masks.values())
    assert abs(removed - 0.5 * sum(m.numel() for m in masks.values())) <= 1
    two_four = sparsity.masks_from_scores(scores, nm=(2, 4))
    for mask in two_four.values():
        assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())  # exactly 2 of every 4


def test_bad_arguments_are_refused():
    scores = sparsity.magnitude_scores(tiny_llama())
    with pytest.raises(ValueError, match="sparsity must be"):
        sparsity.masks_from_scores(scores, 1.0)
    with pytest.raises(ValueError, match="scope"):
        sparsity.masks_from_scores(scores, 0.5, "block")
    with pytest.raises(ValueError, match="nm must be"):
        sparsity.masks_from_scores(scores, nm=(4, 2))
    with pytest.raises(ValueError, match="Conv1D"):
        sparsity.magnitude_scores(tiny_gpt2())
    model = tiny_llama()
    with pytest.raises(ValueError, match="no decoder projection"):
        sparsity.apply_masks(model, {"lm_head": torch.ones(100, 32, dtype=torch.bool)})


def test_fine_tuning_never_revives_a_pruned_weight_and_bake_makes_it_plain():
    model = tiny_llama().train()
    masks = sparsity.masks_from_scores(sparsity.magnitude_scores(model), 0.5)
    sparsity.apply_masks(model, masks)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _calibration()[0]
    for _ in range(5):
        optimiser.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimiser.step()
    modules = sparsity.linear_layers(model)
    for name, mask in masks.items():
        assert float(modules[name].weight.detach()[~mask].abs().max()) == 0.0  # still zero after 5 Adam steps
    sparsity.bake(model)
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in model.state_dict())
    assert abs(sparsity.sparsity_of(model) - 0.5) < 0.01


def test_wanda_is_weight_magnitude_times_input_norm_over_real_tokens():
    model = tiny_llama()
    calibration = _calibration()
    scores = sparsity.wanda_scores(model, calibration)
    name = next(n for n in scores if n.endswith("mlp.down_proj"))
    module, x = _real_inputs(model, name, calibration[0])
    expected = module.weight.abs() * x.norm(dim=0)[None]
    assert torch.allclose(scores[name], expected, atol=1e-5)
    padded = [{**calibration[0], "input_ids": calibration[0]["input_ids"].clone()}]
    padded[0]["input_ids"][2:, 12:] = 5  # other ids under the padding change nothing
    assert torch.allclose(sparsity.wanda_scores(model, padded)[name], scores[name], atol=1e-6)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reaches_the_pattern_and_beats_magnitude_on_layer_output(nm):
    model = tiny_llama()
    calibration = _calibration()
    first = next(n for n in sparsity.linear_layers(model) if n.endswith("0.self_attn.q_proj"))
    module, x = _real_inputs(model, first, calibration[0])
    dense = module.weight.detach().clone()
    magnitude = dense * sparsity.masks_from_scores({first: dense.abs()}, 0.5, "row", nm)[first]
    pruned = copy.deepcopy(model)
    masks = sparsity.sparsegpt(pruned, calibration, 0.5, nm)
    sparsity.bake(pruned)
    w = sparsity.linear_layers(pruned)[first].weight.detach()
    assert torch.equal(w == 0, ~masks[first]) or bool((w[~masks[first]] == 0).all())
    if nm:
        assert bool((masks[first].reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
    else:
        assert abs(sparsity.sparsity_of(pruned) - 0.5) < 0.02
    err = lambda v: float((x @ (dense - v).T).norm())  # noqa: E731
    assert err(w) < err(magnitude)  # the second-order update repairs what the mask removes
    with pytest.raises(ValueError, match="bake"):
        sparsity.sparsegpt(sparsity.apply_masks(copy.deepcopy(model), masks), calibration)


def test_sparsegpt_refuses_groups_that_do_not_divide_the_inputs_and_leaves_the_model_intact():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    widths = {m.in_features for m in sparsity.linear_layers(model).values()}
    m = next(k for k in (3, 5, 7, 9, 11) if any(w % k for w in widths))  # a group size some input size breaks
    with pytest.raises(ValueError, match="does not divide the input size"):
        sparsity.sparsegpt(model, _calibration(), nm=(1, m))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_damage_curves_match_pruning_one_layer_of_the_whole_model_and_leave_it_unchanged():
    from course_utils import evaluation

    model = tiny_llama(num_hidden_layers=3)
    before = copy.deepcopy(model.state_dict())
    scores = sparsity.wanda_scores(model, _calibration(0))
    probe = _calibration(1)
    grid = (0.25, 0.5, 0.75)
    curves = sparsity.damage_curves(model, scores, probe, grid)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    base = evaluation.calibration_loss(model, probe)
    layers = sparsity.projections_by_layer(model)
    for index in (0, 2):
        for j, share in enumerate(grid):
            pruned = copy.deepcopy(model)
            masks = sparsity.masks_from_scores({n: scores[n] for n in layers[index]}, share, "row")
            sparsity.bake(sparsity.apply_masks(pruned, masks))
            expected = evaluation.calibration_loss(pruned, probe) - base
            assert abs(float(curves[index, j]) - expected) < 1e-5, (index, share)
    assert float(curves[:, -1].sum()) > 0  # 75 % of each layer's weights gone costs the random model something


def test_allocate_keeps_the_mean_spares_the_steep_layer_and_layer_masks_follow_it():
    model = tiny_llama(num_hidden_layers=3)
    grid = (0.25, 0.5, 0.75)
    curves = torch.tensor([[0.1, 0.4, 2.0], [0.01, 0.02, 0.05], [0.02, 0.05, 0.1]])
    shares = sparsity.allocate(model, curves, 0.5, grid, max_sparsity=0.75)
    assert abs(sum(shares) / 3 - 0.5) < 1e-9
    assert shares[0] < 0.5 < shares[1]  # the layer whose curve is steep keeps more
    masks = sparsity.layer_masks(model, sparsity.magnitude_scores(model), shares)
    for layer, share in zip(sparsity.projections_by_layer(model), shares, strict=True):
        for name in layer:
            assert 1 - masks[name].float().mean().item() == pytest.approx(
                int(share * masks[name].shape[1]) / masks[name].shape[1])
    with pytest.raises(ValueError, match="one row per decoder layer"):
        sparsity.allocate(model, curves[:2], 0.5, grid)
    with pytest.raises(ValueError, match="one sparsity per decoder layer"):
        sparsity.layer_masks(model, sparsity.magnitude_scores(model), shares[:2])
    with pytest.raises(ValueError, match="global"):
        sparsity.layer_masks(model, sparsity.magnitude_scores(model), shares, scope="global")


def test_sparsegpt_takes_a_sparsity_per_layer_and_refuses_a_wrong_list_intact():
    model = tiny_llama(num_hidden_layers=3)
    shares = [0.25, 0.5, 0.75]
    pruned = copy.deepcopy(model)
    sparsity.sparsegpt(pruned, _calibration(), shares)
    sparsity.bake(pruned)
    for layer, share in zip(sparsity.projections_by_layer(pruned), shares, strict=True):
        zeros = sum(int((m.weight == 0).sum()) for m in layer.values()) / sum(m.weight.numel() for m in layer.values())
        assert abs(zeros - share) < 0.02
    before = copy.deepcopy(model.state_dict())
    for bad, kwargs in (([0.5, 0.5], {}), ([0.5, 1.0, 0.5], {}), (shares, {"nm": (2, 4)})):
        with pytest.raises(ValueError):
            sparsity.sparsegpt(model, _calibration(), bad, **kwargs)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_drop_lowest_matches_a_stable_sort_even_with_many_ties():
    """The kthvalue shortcut drops exactly what a stable sort would: the k lowest, ties in index order."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (7, 40), generator=g).float()  # five values: ties everywhere
    for k in (0, 1, 13, 20, 39, 40):
        by_sort = torch.ones_like(scores, dtype=torch.bool)
        by_sort.scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], False)
        assert torch.equal(sparsity.drop_lowest(scores, k), by_sort)
    weights = {"a": torch.randint(0, 3, (6, 8), generator=g).float(),
               "b": torch.randint(0, 3, (4, 8), generator=g).float()}
    row, layer, flat = (sparsity.masks_from_scores(weights, 0.5, scope) for scope in ("row", "layer", "global"))
    assert all(bool(((~m).sum(1) == 4).all()) for m in row.values())  # exactly half of every row, ties or not
    assert [int((~m).sum()) for m in layer.values()] == [24, 16]
    everything = torch.cat([w.flatten() for w in weights.values()])
    expected = torch.ones_like(everything, dtype=torch.bool)
    expected[everything.argsort(stable=True)[:40]] = False  # 40 of the 80 weights, model-wide
    assert torch.equal(torch.cat([m.flatten() for m in flat.values()]), expected)
