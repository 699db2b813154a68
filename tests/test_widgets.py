"""The classroom explorer: each what-if computes what the real removal computes, counts the parameters a real
removal takes away, restores the model bit for bit, and its widget runs headless."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import padded_batch, tiny_llama
from transformers import AutoTokenizer

from course_utils import anatomy, bypass, hooks, models, surgery, widgets
from course_utils.data import load_documents


@pytest.fixture(scope="module")
def explorer():
    tokenizer = AutoTokenizer.from_pretrained(models.smollm2_dir())
    model = tiny_llama(num_hidden_layers=4, intermediate_size=64, vocab_size=len(tokenizer)).eval()
    calibration = [padded_batch(seed=s, vocab=len(tokenizer)) for s in range(2)]
    return widgets.Explorer(model, tokenizer, calibration, load_documents("evaluation")[:3], eval_tokens=96,
                            max_new_tokens=4)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_each_what_if_equals_the_real_removal_and_counts_its_parameters(explorer):
    model, batch = explorer.model, padded_batch(seed=9, vocab=explorer.model.config.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model, batch)
    for method, ratio in [("width", 0.25), ("depth", 0.5), ("bypass", 0.5)]:
        what, removed, _ = explorer.plan(method, ratio)
        real = copy.deepcopy(model)
        if method == "width":
            keep = {i: torch.tensor(sorted(set(range(64)) - set(idx.tolist()))) for i, idx in what.items()}
            surgery.remove_mlp_neurons(real, keep)
        elif method == "depth":
            surgery.drop_layers(real, what)
        else:
            bypass.bypass_attention(real, what)
        assert anatomy.count_parameters(model) - anatomy.count_parameters(real) == removed > 0, method
        with explorer.applied(method, ratio):
            what_if = _logits(model, batch)
        mask = batch["attention_mask"].bool()
        assert torch.allclose(what_if[mask], _logits(real, batch)[mask], atol=1e-5), method
        assert not torch.allclose(what_if[mask], base[mask], atol=1e-3), method  # the setting did change the output
    assert hooks.count_hooks(model) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights never touched
    assert torch.equal(_logits(model, batch), base)


def test_measure_caches_and_the_figure_shows_every_setting(explorer):
    first = explorer.measure("depth", 0.25)
    assert explorer.measure("depth", 0.25) is first  # recalled, not recomputed
    base = explorer.measure("width", 0.0)
    assert base.method == "base" and base.parameters_removed == 0 and first.ppl != base.ppl
    assert first.share_removed == pytest.approx(first.parameters_removed / anatomy.count_parameters(explorer.model))
    fig = explorer.figure(first)
    assert len(fig.axes[0].patches) == len(explorer.measured)
    assert "parameters removed" in explorer.report(first) and "held-out PPL" in explorer.report(first)
    assert explorer.figure().axes[0].get_ylabel().startswith("held-out PPL")
    validation = copy.copy(explorer)
    validation.split = "validation"  # documents named for what they are: lesson 12 explores on validation
    assert "validation PPL" in validation.report(first) and "held-out" not in validation.report(first)
    low, high = first.ppl_range
    assert low <= first.ppl <= high and low < high  # three documents, three perplexities


def test_the_widget_builds_headless_and_a_change_measures_a_new_setting(explorer):
    pytest.importorskip("ipywidgets")
    box = explorer.widget("width", 0.25)
    n = len(explorer.measured)
    choose, slide = box.children[0].children
    slide.value = 0.5
    assert len(explorer.measured) == n + 1 and ("width", 0.5) in explorer.measured
    choose.value = "bypass"
    assert ("bypass", 0.5) in explorer.measured


def test_bad_settings_are_refused(explorer):
    with pytest.raises(ValueError, match="unknown method"):
        explorer.measure("heads", 0.2)
    with pytest.raises(ValueError):
        explorer.measure("width", 1.5)
    with pytest.raises(ValueError, match="keep at least one"):
        explorer.plan("depth", 0.9)
