"""Tests for course_utils.surgery on tiny random GPT-2 and Llama models."""

import pytest
import torch
from conftest import word_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from course_utils import arch, surgery

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def tiny_model(family: str, mlp_bias: bool = False) -> nn.Module:
    """A 2-layer random GPT-2 (MLP width 128) or Llama (MLP width 64) in eval mode."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, mlp_bias=mlp_bias)
    return LlamaForCausalLM(config).eval()


def calibration() -> list[dict]:
    """One random batch (2, 8) whose second row is right-padded after 5 tokens."""
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return [{"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1)),
             "attention_mask": mask}]


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name


@pytest.mark.parametrize(("family", "mlp_bias"), [("gpt2", False), ("llama", False), ("llama", True)])
def test_removing_silent_neurons_preserves_function(family, mlp_bias):
    model = tiny_model(family, mlp_bias)
    dead = torch.tensor([0, 5, 17, 40])
    with torch.no_grad():
        for index in range(arch.num_layers(model)):
            out = arch.mlp_parts(model, index).output.weight
            if family == "gpt2":
                out[dead] = 0  # Conv1D c_proj: (width, hidden), a neuron is a row
            else:
                out[:, dead] = 0  # Linear down_proj: (hidden, width), a neuron is a column
    expected = logits(model)
    width = arch.mlp_parts(model, 0).width
    keep = torch.ones(width, dtype=torch.bool)
    keep[dead] = False
    surgery.remove_mlp_neurons(model, {0: keep.nonzero().flatten(), 1: keep.nonzero().flatten()})
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    assert arch.intermediate_size(model) == width - len(dead)
    parts = arch.mlp_parts(model, 1)
    assert parts.width == width - len(dead)
    assert all(p.weight.dtype == torch.float32 for p in (*parts.inputs, parts.output))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prune_mlp_shrinks_and_reloads(family, tmp_path):
    model = tiny_model(family)
    width = arch.mlp_parts(model, 0).width
    report = surgery.prune_mlp(model, 0.25, method="l2")
    assert report.params_after < report.params_before
    assert report.kept_width == {0: width * 3 // 4, 1: width * 3 // 4}
    assert arch.intermediate_size(model) == width * 3 // 4
    assert not hasattr(model.config, "intermediate_sizes")
    expected = logits(model)
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=0, rtol=0)
    assert str(report).startswith("prune_mlp(l2, ratio=0.25)")


def test_prune_mlp_with_calibration_and_protected_layer():
    model = tiny_model("llama")
    report = surgery.prune_mlp(model, 0.5, method="flap", calibration=calibration(), protect=(0,))
    assert report.kept_width == {0: 64, 1: 32}
    assert model.config.intermediate_sizes == [64, 32]
    assert model.config.intermediate_size == 64
    assert model.model.layers[1].mlp.intermediate_size == 32
    assert torch.isfinite(logits(model)).all()


def test_uniform_pruning_clears_an_old_per_layer_list():
    model = tiny_model("gpt2")
    surgery.prune_mlp(model, 0.5, protect=(1,))
    assert model.config.intermediate_sizes == [64, 128]
    surgery.remove_mlp_neurons(model, {1: torch.arange(64)})
    assert model.config.n_inner == 64 and not hasattr(model.config, "intermediate_sizes")


def test_select_neurons_keeps_the_highest_scores():
    scores = {0: torch.tensor([0.1, 0.9, 0.5, 0.7]), 1: torch.tensor([3.0, 1.0, 2.0, 0.0])}
    keep = surgery.select_neurons(scores, 0.5, protect=(1,))
    assert keep[0].tolist() == [1, 3]
    assert keep[1].tolist() == [0, 1, 2, 3]
    assert keep[0].dtype == torch.long
    with pytest.raises(ValueError, match="protected layers \\[5\\]"):
        surgery.select_neurons(scores, 0.5, protect=(5,))


@pytest.mark.parametrize(("width", "ratio", "multiple_of", "expected"), [
    (64, 0.3, 1, 45),  # 44.8 -> 45
    (64, 0.3, 8, 48),  # 5.6 blocks of 8 -> 6
    (64, 0.3, 16, 48),  # 2.8 blocks of 16 -> 3
    (10, 0.95, 4, 4),  # never 0
    (6, 0.0, 4, 6),  # never above the width
    (64, 0.0, 1, 64),
])
def test_kept_width_rounding(width, ratio, multiple_of, expected):
    assert surgery.kept_width(width, ratio, multiple_of) == expected


def test_prune_mlp_rounds_to_multiple_of():
    model = tiny_model("llama")
    report = surgery.prune_mlp(model, 0.3, method="l1", multiple_of=16)
    assert report.kept_width == {0: 48, 1: 48}
    assert model.config.intermediate_size == 48


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(ratio=1.0), "must be in \\[0, 1\\); got 1.0"),
    (dict(ratio=1.2), "must be in \\[0, 1\\); got 1.2"),
    (dict(ratio=-0.1), "got -0.1"),
    (dict(ratio="a"), "got 'a'"),
    (dict(ratio=0.5, protect=(99,)), "\\[0, 1\\] for this 2-layer model; got 99"),
    (dict(ratio=0.5, method="nope"), "unknown importance method"),
    (dict(ratio=0.5, method="flap"), "needs calibration data"),
    (dict(ratio=0.5, method="wanda_like", calibration=[]), "needs calibration data"),
    (dict(ratio=0.5, multiple_of=0), "multiple_of"),
])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prune_mlp_bad_input_leaves_model_untouched(family, kwargs, message):
    model = tiny_model(family)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        surgery.prune_mlp(model, **kwargs)
    assert_unchanged(model, before)


def test_prune_mlp_rejects_unsupported_model():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100))
    before = snapshot(model)
    with pytest.raises(ValueError, match="unsupported architecture 'bert'.*GPT-2"):
        surgery.prune_mlp(model, 0.5)
    assert_unchanged(model, before)


@pytest.mark.parametrize(("bad_layer_1", "message"), [
    (torch.tensor([0, 64]), "must be in \\[0, 63\\]"),
    (torch.tensor([-1, 3]), "must be in \\[0, 63\\]"),
    (torch.tensor([2, 2, 5]), "duplicates"),
    (torch.tensor([], dtype=torch.long), "empty"),
    (torch.tensor([0.0, 1.0]), "integer"),
    (torch.tensor([[0, 1]]), "1-D"),
])
def test_remove_mlp_neurons_validates_every_layer_first(bad_layer_1, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        surgery.remove_mlp_neurons(model, {0: torch.arange(10), 1: bad_layer_1})
    assert_unchanged(model, before)
    assert model.config.intermediate_size == 64


def test_remove_mlp_neurons_rejects_bad_layer_index():
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match="got 2"):
        surgery.remove_mlp_neurons(model, {0: torch.arange(10), 2: torch.arange(10)})
    assert_unchanged(model, before)


def _stats_with_gram(model: nn.Module) -> dict:
    from course_utils import hooks

    batches = [{"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(s)),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for s in range(4)]
    with hooks.capture_mlp_activations(model, gram=True) as tap:
        tap.run(model, batches)
    return tap.stats, batches


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_refit_with_every_neuron_kept_is_the_identity(family):
    model = tiny_model(family)
    stats, _ = _stats_with_gram(model)
    out = arch.mlp_parts(model, 0).output
    weight = out.weight.detach() if isinstance(out, nn.Linear) else out.weight.detach().T
    bias = out.bias.detach() if out.bias is not None else None
    keep = torch.arange(arch.mlp_parts(model, 0).width)
    new_weight, new_bias = surgery.refit_output(weight, bias, stats[0], keep, shrink_to_slice=0.0)
    torch.testing.assert_close(new_weight, weight, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(new_bias, bias if bias is not None else torch.zeros_like(new_bias),
                               atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_refit_reduces_the_layer_output_error(family, tmp_path):
    """On the calibration tokens, the refitted MLP reproduces the original outputs better than plain slicing."""
    from course_utils import hooks

    base = tiny_model(family)
    stats, batches = _stats_with_gram(base)
    half = torch.arange(0, arch.mlp_parts(base, 0).width, 2)
    keep = {0: half, 1: half}  # half the neurons of both layers: a uniform width reloads with a stock config

    def mlp_outputs(model):
        captured = []
        mlp = getattr(arch.decoder_layers(model)[0], arch.get_spec(model).mlp)
        handle = mlp.register_forward_hook(lambda m, a, o: captured.append(o.detach()))
        try:
            with torch.no_grad():
                for batch in batches:
                    model(**batch)
        finally:
            handle.remove()
        return torch.cat(captured)

    target = mlp_outputs(base)
    sliced, refitted = tiny_model(family), tiny_model(family)
    surgery.remove_mlp_neurons(sliced, keep)
    surgery.remove_mlp_neurons(refitted, keep, refit=stats)
    error_sliced = (mlp_outputs(sliced) - target).pow(2).mean()
    error_refit = (mlp_outputs(refitted) - target).pow(2).mean()
    assert error_refit < 0.8 * error_sliced
    assert hooks.count_hooks(refitted) == 0
    if family == "llama":  # the refit bias travels in a stock config (mlp_bias=True)
        assert refitted.config.mlp_bias is True
        refitted.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(logits(reloaded), logits(refitted), rtol=0, atol=0)


def test_refit_without_gram_changes_nothing():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="Gram matrix for layer 0"):
        surgery.remove_mlp_neurons(model, {0: torch.arange(10)}, refit={})
    assert_unchanged(model, before)


def test_allocate_ratios_spares_sensitive_layers():
    sensitivity = torch.tensor([8.0, 1.0, 0.5, 2.0])
    ratios = surgery.allocate_ratios(sensitivity, 0.3, power=2.0)
    assert sum(ratios.values()) / 4 == pytest.approx(0.3, abs=1e-6)
    assert ratios[0] < ratios[3] < ratios[1] < ratios[2]  # less sensitive -> pruned harder
    assert ratios[2] / ratios[1] == pytest.approx(2.0, rel=1e-4)  # r ~ 1/s for power 2
    protected = surgery.allocate_ratios(sensitivity, 0.3, protect=[0])
    assert protected[0] == 0.0 and sum(protected.values()) / 4 == pytest.approx(0.3, abs=1e-6)
    assert max(surgery.allocate_ratios(sensitivity, 0.6, max_ratio=0.8).values()) <= 0.8 + 1e-9
    with pytest.raises(ValueError, match="cannot remove a mean"):
        surgery.allocate_ratios(sensitivity, 0.9, max_ratio=0.85)
    # a probe reading of ~0 (or below) must not swallow the whole budget; the mean is still met
    spiky = surgery.allocate_ratios(torch.tensor([0.6, -0.001, 0.03, 0.05, 0.02, 0.1]), 0.2)
    assert sum(spiky.values()) / 6 == pytest.approx(0.2, abs=1e-6)
    assert spiky[1] == pytest.approx(0.85) and spiky[0] < spiky[3] < spiky[2]
    with pytest.raises(ValueError, match="power must be > 1"):
        surgery.allocate_ratios(sensitivity, 0.3, power=1.0)


def test_layer_sensitivity_probe_leaves_the_model_alone():
    from course_utils import hooks, importance

    model = tiny_model("llama")
    before = snapshot(model)
    stats = importance.collect_stats(model, calibration())
    sensitivity = surgery.layer_sensitivity(model, stats, calibration(), probe_ratio=0.5)
    assert sensitivity.shape == (2,) and torch.isfinite(sensitivity).all()
    assert (sensitivity != 0).all()  # silencing half the neurons changes the loss
    assert hooks.count_hooks(model) == 0
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_sensitivity_equals_a_full_forward_with_the_layer_silenced(family):
    """The probe starts each evaluation at the probed layer; the numbers are those of full forward passes."""
    from course_utils import evaluation, importance

    model = tiny_model(family)
    batches = calibration()  # padded: the mask must reach every layer the probe runs
    stats = importance.collect_stats(model, batches)
    sensitivity = surgery.layer_sensitivity(model, stats, batches, probe_ratio=0.5)
    base_loss = evaluation.calibration_loss(model, batches)
    for index in range(2):
        scores = importance.score_layer(model, index, "wanda_like", stats[index])
        dropped = scores.argsort()[:scores.numel() - surgery.kept_width(scores.numel(), 0.5)]

        def silence(module, args, dropped=dropped, mean=stats[index].mean):
            x = args[0].clone()
            x[..., dropped] = mean[dropped]
            return (x,)

        handle = arch.mlp_parts(model, index).output.register_forward_pre_hook(silence)
        try:
            expected = evaluation.calibration_loss(model, batches) - base_loss
        finally:
            handle.remove()
        assert sensitivity[index].item() == pytest.approx(expected, abs=1e-5)
    unmasked = [{"input_ids": batches[0]["input_ids"]}]
    with pytest.raises(ValueError, match="attention_mask"):
        surgery.layer_sensitivity(model, stats, unmasked)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_obs_selection_beats_magnitude_selection_after_refit(family):
    """OBS picks a set whose least-squares refit reproduces the MLP output better than a score-based set."""
    from course_utils import importance

    model = tiny_model(family)
    stats, _ = _stats_with_gram(model)
    width = arch.mlp_parts(model, 0).width
    out = arch.mlp_parts(model, 0).output
    weight = out.weight.detach() if isinstance(out, nn.Linear) else out.weight.detach().T
    bias = out.bias.detach() if out.bias is not None else None
    moment, mean = stats[0].second_moment, (stats[0].sum / stats[0].count).double()

    def output_error(keep):
        new_weight, new_bias = surgery.refit_output(weight, bias, stats[0], keep)
        full = torch.cat([weight.double(), (bias if bias is not None else torch.zeros(weight.shape[0]))
                          .double()[:, None]], 1)  # (hidden, width + 1)
        reduced = torch.zeros_like(full)
        reduced[:, keep] = new_weight.double()
        reduced[:, width] = new_bias.double()
        diff = full - reduced
        second = torch.ones(width + 1, width + 1, dtype=torch.float64)  # E[x x^T], x = (a, 1)
        second[:width, :width], second[:width, width], second[width, :width] = moment, mean, mean
        return torch.einsum("hi,ij,hj->", diff, second, diff).item()

    n_keep = width // 2
    obs = surgery.obs_keep(model, 0, stats[0], n_keep, chunk=4)
    assert obs.numel() == n_keep and obs.unique().numel() == n_keep
    scored = importance.score_layer(model, 0, "wanda_like", stats[0]).topk(n_keep).indices.sort().values
    assert output_error(obs) < output_error(scored)


def test_prune_mlp_obs_with_sensitivity_allocation_reloads(tmp_path):
    from course_utils import models

    model = tiny_model("llama")
    batches = _stats_with_gram(model)[1]
    report = surgery.prune_mlp(model, 0.25, method="obs", calibration=batches, allocation="sensitivity")
    assert report.params_after < report.params_before
    widths = list(report.kept_width.values())
    assert sum(64 - w for w in widths) == pytest.approx(0.25 * 128, abs=2) and len(set(widths)) == 2
    tokenizer = word_tokenizer()
    path = models.save_pruned(model, tokenizer, tmp_path / "obs")
    reloaded, _ = models.load_pruned(path)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_prune_mlp_refit_needs_calibration():
    model = tiny_model("llama")
    before = snapshot(model)
    for kwargs in (dict(method="obs"), dict(method="l2", refit=True), dict(method="l2", allocation="sensitivity")):
        with pytest.raises(ValueError, match="needs calibration data"):
            surgery.prune_mlp(model, 0.2, **kwargs)
    with pytest.raises(ValueError, match="allocation must be one of"):
        surgery.prune_mlp(model, 0.2, method="l2", allocation="greedy")
    assert_unchanged(model, before)


def _calibration_error(model: nn.Module, reference: torch.Tensor, batches: list[dict]) -> float:
    with torch.no_grad():
        out = model(**batches[0]).logits
    real = batches[0]["attention_mask"].bool()
    return (out - reference)[real].pow(2).mean().item()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequential_obs_on_the_first_layer_equals_obs(family):
    """With only layer 0 pruned, both streams agree up to it, so the sequential method is plain OBS + refit."""
    batches = _stats_with_gram(tiny_model(family))[1]
    plain, sequential = tiny_model(family), tiny_model(family)
    allocation = {0: 0.5, 1: 0.0}
    surgery.prune_mlp(plain, 0.25, method="obs", calibration=batches, allocation=allocation)
    surgery.prune_mlp(sequential, 0.25, method="obs_sequential", calibration=batches, allocation=allocation)
    assert arch.mlp_parts(sequential, 0).width == arch.mlp_parts(plain, 0).width
    assert arch.mlp_parts(sequential, 1).width == arch.mlp_parts(tiny_model(family), 1).width
    torch.testing.assert_close(logits(sequential), logits(plain), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequential_obs_tracks_the_unpruned_model_better(family, tmp_path):
    """Pruning every layer: refitting towards the unpruned outputs on the pruned model's own inputs wins."""
    from course_utils import models

    batches = _stats_with_gram(tiny_model(family))[1]
    base = tiny_model(family)
    with torch.no_grad():
        reference = base(**batches[0]).logits
    plain, sequential = tiny_model(family), tiny_model(family)
    surgery.prune_mlp(plain, 0.5, method="obs", calibration=batches)
    report = surgery.prune_mlp(sequential, 0.5, method="obs_sequential", calibration=batches)
    assert set(report.kept_width.values()) == {arch.mlp_parts(plain, 0).width}
    assert _calibration_error(sequential, reference, batches) < _calibration_error(plain, reference, batches)
    path = models.save_pruned(sequential, word_tokenizer(), tmp_path / "sequential")
    reloaded = AutoModelForCausalLM.from_pretrained(path)  # uniform widths: a stock model
    torch.testing.assert_close(logits(reloaded), logits(sequential), rtol=0, atol=0)


def test_sequential_obs_needs_calibration_and_checks_outputs():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="obs_sequential.*calibration"):
        surgery.prune_mlp(model, 0.2, method="obs_sequential", stats=_stats_with_gram(model)[0])
    with pytest.raises(ValueError, match="outputs must be"):
        surgery.remove_mlp_neurons(model, {0: torch.arange(10)}, outputs={0: (torch.zeros(32, 9), torch.zeros(32))})
    with pytest.raises(ValueError, match="outputs must be"):
        surgery.remove_mlp_neurons(model, {0: torch.arange(10)}, outputs={1: (torch.zeros(32, 10), torch.zeros(32))})
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequential_obs_with_recorded_reference_equals_running_it(family):
    """Outputs recorded during the statistics pass replace the unpruned stream: the same cut, the same weights."""
    from course_utils import importance, streams

    batches = _stats_with_gram(tiny_model(family))[1]
    allocation = {0: 0.0, 1: 0.5}  # layer 0 whole: the two streams stay one until layer 1
    run, read = tiny_model(family), tiny_model(family)
    surgery.prune_mlp(run, 0.25, method="obs_sequential", calibration=batches, allocation=allocation)
    with streams.recording_outputs(read) as reference:
        importance.collect_stats(read, batches, gram=True)
    assert len(reference) == 2 and all(len(r) == len(batches) for r in reference)
    surgery.prune_mlp(read, 0.25, method="obs_sequential", calibration=batches, allocation=allocation,
                      reference=reference)
    assert arch.mlp_parts(read, 1).width == arch.mlp_parts(run, 1).width
    torch.testing.assert_close(snapshot(read), snapshot(run), rtol=1e-5, atol=1e-6)


def test_a_reference_from_other_batches_or_for_another_selection_is_refused_intact():
    from course_utils import streams

    model = tiny_model("llama")
    batches = _stats_with_gram(model)[1]
    before = snapshot(model)
    with streams.recording_outputs(model) as reference, torch.no_grad():
        for batch in batches:
            model(**batch)
    with pytest.raises(ValueError, match="record them with streams.recording_outputs"):
        surgery.prune_mlp(model, 0.5, method="obs_sequential", calibration=batches + batches, reference=reference)
    short = [[out[:, :4] for out in layer] for layer in reference]
    with pytest.raises(ValueError, match="same calibration batches"):
        surgery.prune_mlp(model, 0.5, method="obs_sequential", calibration=batches, reference=short)
    with pytest.raises(ValueError, match="obs_sequential' only"):
        surgery.prune_mlp(model, 0.5, method="obs", calibration=batches, reference=reference)
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_sensitivity_refit_probe_matches_real_surgery(family):
    """The refit probe measures exactly what cutting that layer's weakest half and refitting it costs."""
    from course_utils import evaluation, hooks, importance

    model = tiny_model(family)
    stats, batches = _stats_with_gram(model)
    before = snapshot(model)
    sensitivity = surgery.layer_sensitivity(model, stats, batches, probe_ratio=0.5, refit=True)
    assert hooks.count_hooks(model) == 0
    assert_unchanged(model, before)
    base_loss = evaluation.calibration_loss(model, batches)
    for index in range(2):
        scores = importance.score_layer(model, index, "wanda_like", stats[index])
        pruned = tiny_model(family)
        surgery.remove_mlp_neurons(pruned, surgery.select_neurons({index: scores}, 0.5), refit=stats)
        assert sensitivity[index].item() == pytest.approx(evaluation.calibration_loss(pruned, batches) - base_loss,
                                                          abs=1e-5)
    with pytest.raises(ValueError, match="Gram matrix"):
        surgery.layer_sensitivity(model, importance.collect_stats(model, batches), batches, refit=True)


# ---- allocation from measured damage curves ------------------------------------------------------

GRID = [0.1, 0.2, 0.5]


def test_allocate_from_curves_spends_the_budget_where_damage_is_cheapest():
    damage = torch.tensor([[0.01, 0.02, 0.05],  # cheap everywhere
                           [1.0, 2.0, 5.0],  # expensive
                           [0.02, 0.04, 0.1]])  # in between
    ratios = surgery.allocate_from_curves(damage, 0.2, grid=GRID)
    assert sum(ratios.values()) / 3 == pytest.approx(0.2)
    assert ratios[0] >= ratios[2] >= ratios[1]
    assert ratios[0] == pytest.approx(0.5) and ratios[1] == 0.0
    protected = surgery.allocate_from_curves(damage, 0.2, grid=GRID, protect=[0])
    assert protected[0] == 0.0 and sum(protected.values()) / 3 == pytest.approx(0.2)


def test_allocate_from_curves_uses_the_lower_convex_hull():
    """A layer whose curve is flat up to 0.2 and then jumps: the hull makes 0.2 the natural stop."""
    damage = torch.tensor([[0.3, 0.3, 3.0],  # 0.1 costs as much as 0.2: never stop at 0.1
                           [0.5, 1.0, 2.5]])  # linear, slope 5
    ratios = surgery.allocate_from_curves(damage, 0.1, grid=GRID)
    assert ratios[0] == pytest.approx(0.2) and ratios[1] == pytest.approx(0.0)


def test_allocate_from_curves_rejects_bad_input():
    damage = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="match grid"):
        surgery.allocate_from_curves(damage, 0.1, grid=[0.1, 0.2])
    with pytest.raises(ValueError, match="cannot remove a mean"):
        surgery.allocate_from_curves(damage, 0.4, grid=GRID, protect=[0])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        surgery.allocate_from_curves(damage, 1.0, grid=GRID)
    with pytest.raises(ValueError, match="protect must list"):
        surgery.allocate_from_curves(damage, 0.1, grid=GRID, protect=[2])


def test_damage_curves_are_layer_sensitivity_at_each_grid_ratio():
    model = tiny_model("llama")
    stats, batches = _stats_with_gram(model)
    curves = surgery.damage_curves(model, stats, batches, grid=GRID)
    assert curves.shape == (2, 3)
    middle = surgery.layer_sensitivity(model, stats, batches, probe_ratio=0.2, refit=True)
    torch.testing.assert_close(curves[:, 1], middle)
    with pytest.raises(ValueError, match="increasing"):
        surgery.damage_curves(model, stats, batches, grid=[0.5, 0.2])


def _refit_residual_by_lstsq(model: nn.Module, batches: list[dict], keep: torch.Tensor) -> float:
    """Brute force: layer 0's output-projection inputs on every token, the kept columns and a bias fitted to the
    original output by least squares on those tokens, and the mean squared error per token that is left."""
    out = arch.mlp_parts(model, 0).output
    seen = []
    handle = out.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().reshape(-1,
                                                                                              args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    acts = torch.cat(seen).double()  # every token is real: the batches have no padding
    weight = (out.weight.detach() if isinstance(out, nn.Linear) else out.weight.detach().T).double()
    bias = out.bias.detach().double() if out.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    target = acts @ weight.T + bias
    design = torch.cat([acts[:, keep], torch.ones(acts.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution
    return float((target - design @ solution).pow(2).sum(1).mean())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_obs_residuals_equal_a_least_squares_refit_on_the_tokens(family):
    model = tiny_model(family)
    stats, batches = _stats_with_gram(model)
    width = arch.mlp_parts(model, 0).width
    widths = [width * 3 // 4, width // 2, width // 4]
    residuals = surgery.obs_residuals(model, 0, stats[0], widths, chunk=1, hessian_damp=0.0)
    assert list(residuals) == sorted(widths)
    for n_keep in widths:  # with chunk 1 the stops do not change the path: each width is obs_keep's own
        keep = surgery.obs_keep(model, 0, stats[0], n_keep, chunk=1, hessian_damp=0.0)
        assert residuals[n_keep] == pytest.approx(_refit_residual_by_lstsq(model, batches, keep), rel=1e-6, abs=1e-9)
    assert residuals[width // 4] > residuals[width // 2] > residuals[width * 3 // 4] > 0  # fewer neurons, more error
    chunked = surgery.obs_residuals(model, 0, stats[0], [width // 2], chunk=4, hessian_damp=0.0)
    keep = surgery.obs_keep(model, 0, stats[0], width // 2, chunk=4, hessian_damp=0.0)  # one stop: obs_keep's path
    assert chunked[width // 2] == pytest.approx(_refit_residual_by_lstsq(model, batches, keep), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="kept widths must lie"):
        surgery.obs_residuals(model, 0, stats[0], [0, 4])


def test_calibrated_curves_pass_through_the_measured_probe():
    model = tiny_model("llama")
    stats, batches = _stats_with_gram(model)
    curves, residuals = surgery.calibrated_curves(model, stats, batches, grid=GRID, probe_ratio=GRID[1], smooth=1)
    assert curves.shape == residuals.shape == (2, len(GRID))
    measured = surgery.layer_sensitivity(model, stats, batches, probe_ratio=GRID[1], refit=True)
    torch.testing.assert_close(curves[:, 1], measured.clamp_min(0))
    for layer in range(2):  # the shape is the residual's: the same ratios between grid points
        if measured[layer] > 0:
            torch.testing.assert_close(curves[layer] / curves[layer, 1], residuals[layer] / residuals[layer, 1])
    direct = surgery.residual_curves(model, stats, grid=GRID)
    torch.testing.assert_close(direct, residuals)
    assert (direct[:, 1:] >= direct[:, :-1]).all()  # residuals grow with the ratio removed
    allocation = surgery.allocate_from_curves(curves, 0.2, grid=GRID)
    assert sum(allocation.values()) == pytest.approx(0.2 * 2)
    with pytest.raises(ValueError, match="probe_ratio must be one of"):
        surgery.calibrated_curves(model, stats, batches, grid=GRID, probe_ratio=0.33)
    reused, _ = surgery.calibrated_curves(model, stats, batches, grid=GRID, probe_ratio=GRID[1], residuals=direct,
                                          smooth=1)
    torch.testing.assert_close(reused, curves)  # precomputed residuals give the same curves
    # smoothed: each layer's scale is the median of its neighbours' (here both layers: the mean of the two scales)
    pooled, _ = surgery.calibrated_curves(model, stats, batches, grid=GRID, probe_ratio=GRID[1], residuals=direct,
                                          smooth=3)
    scales = measured.double().clamp_min(0) / direct[:, 1].double()
    torch.testing.assert_close(pooled, (direct.double() * scales.mean()).float())
    with pytest.raises(ValueError, match="smooth is a number of layers"):
        surgery.calibrated_curves(model, stats, batches, grid=GRID, probe_ratio=GRID[1], smooth=0)
    with pytest.raises(ValueError, match="residuals must have shape"):
        surgery.calibrated_curves(model, stats, batches, grid=GRID, probe_ratio=GRID[1], residuals=direct[:, :2])
