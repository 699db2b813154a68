"""Attention bypass (static and adaptive) on tiny random GPT-2 and Llama models."""

from pathlib import Path

import pytest
import torch
from conftest import padded_batch, tiny_llama, word_tokenizer
from torch import nn

from course_utils import arch, bypass, data, hooks, importance, models

IDS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(5))
FAMILIES = ["gpt2", "llama"]


def model_for(family: str, n_layers: int = 3) -> nn.Module:
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(n_layer=n_layers, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
        return GPT2LMHeadModel(config).eval()
    return tiny_llama(num_hidden_layers=n_layers)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def zero_attention_output(model: nn.Module, index: int) -> None:
    o = arch.attention_parts(model, index).o
    o.weight.zero_()
    if getattr(o, "bias", None) is not None:
        o.bias.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_bypassed_sublayer_passes_the_residual_stream_unchanged(family):
    model = model_for(family)
    reference = model_for(family)
    zero_attention_output(reference, 1)  # attention that adds exactly nothing
    bypass.bypass_attention(model, [1])
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    assert model.config.bypassed_attention == [1]
    assert bypass.bypassed_layers(model) == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_bypass_drops_the_attention_weights(family):
    model = model_for(family)
    before = models.count_parameters(model)
    attention = models.count_parameters(arch.attention_parts(model, 0).module)
    norm = models.count_parameters(getattr(arch.decoder_layers(model)[0], arch.get_spec(model).norms[0]))
    bypass.bypass_attention(model, [0])
    assert models.count_parameters(model) == before - attention - norm
    assert not any(".0." + arch.get_spec(model).attn + "." in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("layers", [[0], [1], [0, 2]])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_cache_equals_without_cache(family, layers):
    model = model_for(family)
    bypass.bypass_attention(model, layers)
    prompt = IDS[:1]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(with_cache, model.generate(prompt, use_cache=False, **kwargs))


def test_bypassed_layers_keep_no_keys_or_values():
    from transformers import DynamicCache

    model = tiny_llama(num_hidden_layers=3)
    bypass.bypass_attention(model, [0])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS[:1], **arch.cache_kwargs(model, cache))
    assert cache.layers[0].keys.shape == (1, 1, IDS.shape[1], 1)  # the position counter only
    assert cache.layers[1].keys.shape == (1, 2, IDS.shape[1], 8)  # real keys: 2 KV heads of 8 dims
    assert cache.get_seq_length() == IDS.shape[1]



@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_bypass_counts_positions_under_either_cache_argument_name(name):
    # transformers 5.24 renamed past_key_values to cache; the bypass must fill the slot under both names
    from transformers import DynamicCache

    cache = DynamicCache()
    hidden = torch.randn(2, 5, 16)
    out, weights = bypass.AttentionBypass(layer_idx=0)(hidden, **{name: cache})
    assert weights is None and torch.equal(out, torch.zeros_like(hidden))
    assert cache.get_seq_length() == 5

@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_pruned_round_trip(family, tmp_path):
    model = model_for(family)
    bypass.bypass_attention(model, [0, 2])
    path = models.save_pruned(model, word_tokenizer(), tmp_path / "bypassed")
    assert models.needs_custom_loader(model.config)
    assert "load_pruned" in (path / "README.md").read_text()
    reloaded, _ = models.load_pruned(path)
    assert bypass.bypassed_layers(reloaded) == [0, 2]
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    full = model_for(family)
    full.save_pretrained(tmp_path / "full")
    assert (path / "model.safetensors").stat().st_size < (tmp_path / "full" / "model.safetensors").stat().st_size


def test_bypass_then_drop_layers_keeps_the_record_in_step(tmp_path):
    from course_utils import surgery

    model = tiny_llama(num_hidden_layers=4)
    bypass.bypass_attention(model, [1, 3])
    surgery.drop_layers(model, [0])
    assert model.config.bypassed_attention == [0, 2]
    reloaded, _ = models.load_pruned(models.save_pruned(model, word_tokenizer(), tmp_path))
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("layers, message", [([3], "layer index"), ([0, 0], "duplicates"), ([-1], "layer index")])
def test_bad_bypass_input_leaves_the_model_intact(layers, message):
    model = tiny_llama(num_hidden_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        bypass.bypass_attention(model, layers)
    assert bypass.bypassed_layers(model) == [] and model.state_dict().keys() == before.keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_importance_is_zero_for_silent_and_bypassed_sublayers(family):
    model = model_for(family)
    zero_attention_output(model, 0)
    scores = importance.attention_importance(model, [padded_batch()])
    assert scores[0] < 1e-6 and (scores[1:] > 1e-4).all()
    bypass.bypass_attention(model, [2])
    assert importance.attention_importance(model, [padded_batch()])[2] < 1e-6
    assert hooks.count_hooks(model) == 0


def test_choose_bypass_picks_the_silent_sublayer_first_and_leaves_the_model_alone():
    model = tiny_llama(num_hidden_layers=4)
    zero_attention_output(model, 2)
    before = logits(model)
    chosen = bypass.choose_bypass(model, [padded_batch()], 2)
    assert 2 in chosen and len(chosen) == 2
    assert bypass.choose_bypass(model, [padded_batch()], 1, iterative=False) == [2]
    assert 2 not in bypass.choose_bypass(model, [padded_batch()], 2, protect=[2])
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    assert not any(isinstance(m, bypass.AttentionBypass) for m in model.modules())
    with pytest.raises(ValueError, match="n_layers"):
        bypass.choose_bypass(model, [padded_batch()], 5)
    with pytest.raises(ValueError, match="calibration"):
        bypass.choose_bypass(model, [], 1)


def test_skipping_restores_the_model_even_when_the_body_raises():
    model = tiny_llama(num_hidden_layers=3)
    before = logits(model)
    with pytest.raises(RuntimeError), bypass.skipping(model, [0, 1]):
        assert not torch.allclose(logits(model), before)
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


# ---- adaptive bypass ---------------------------------------------------------------------------

class CharTokenizer:
    """Maps characters to ids 1..99: enough to route prompts on a tiny model."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[1 + ord(c) % 99 for c in text]])}


PROMPTS = ["a b", "aaaa", "abc abc", "hello", "zz top", "the cat sat on the mat",
           "a much longer prompt about many different things, with punctuation!",
           "Another long and varied prompt: numbers 12345, CAPITALS, and symbols #@%."] * 2


def test_router_calibration_round_trips_and_simple_prompts_skip_at_least_as_much(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    router = bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3, 1, 2, 0],
                                             tolerance=10.0, skip_grid=range(0, 5))
    skips = router.calibration.skip_per_band
    assert len(skips) == 3 and skips == sorted(skips, reverse=True)
    path = router.calibration.save(tmp_path / "router.json")
    loaded = bypass.AdaptiveBypass(model, bypass.RouterCalibration.load(path))
    short, long = CharTokenizer()("ab")["input_ids"], CharTokenizer()(PROMPTS[7])["input_ids"]
    assert loaded.plan(short) == router.plan(short)
    assert len(loaded.plan(short)) >= len(loaded.plan(long))


def test_router_generation_equals_static_skipping_of_its_plan():
    model = tiny_llama(num_hidden_layers=4)
    router = bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3, 1, 2, 0],
                                             tolerance=10.0, skip_grid=range(0, 5))
    prompt = CharTokenizer()("ab")["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    routed = router.generate(prompt, **kwargs)
    with bypass.skipping(model, router.plan(prompt)):
        static = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(routed, static)
    assert not any(isinstance(m, bypass.AttentionBypass) for m in model.modules())


def test_router_bad_input():
    model = tiny_llama(num_hidden_layers=4)
    with pytest.raises(ValueError, match="calibration prompts"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS[:3], order=[0])
    with pytest.raises(ValueError, match="order is empty"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[])
    router = bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3], skip_grid=[0, 1])
    with pytest.raises(ValueError, match="another model"):
        bypass.AdaptiveBypass(tiny_llama(num_hidden_layers=2), router.calibration)
    with pytest.raises(ValueError, match="empty prompt"):
        bypass.prompt_features(model, torch.tensor([], dtype=torch.long))


CONTINUATIONS = [" and then some more text follows here", " x", " yes, it goes on and on", " more"] * 4


@torch.no_grad()
def _continuation_loss_by_hand(model, prompt, continuation, skip, tokens):
    """One prompt at a time, no padding: mean loss on the continuation's first ``tokens`` tokens given the prompt."""
    p, c = CharTokenizer()(prompt)["input_ids"][0], CharTokenizer()(continuation)["input_ids"][0][:tokens]
    with bypass.skipping(model, skip):
        logits = model(torch.cat([p, c])[None]).logits[0, len(p) - 1:-1]
    return torch.nn.functional.cross_entropy(logits, c).item()


def test_router_calibrated_on_continuations_measures_each_prompt_by_hand(tmp_path):
    """Batched and padded inside calibrate; here one prompt at a time: every band's mean, its standard error and
    the two half-tables agree; the calibration records its target and reloads identically."""
    model = tiny_llama(num_hidden_layers=4)
    order, grid, tokens = [3, 1, 2, 0], [0, 2, 4], 5
    router = bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=order, tolerance=0.05,
                                             skip_grid=grid, continuations=CONTINUATIONS, continuation_tokens=tokens,
                                             batch_size=3)
    cal = router.calibration
    groups = [(i + 1) // 2 for i in range(len(PROMPTS))]  # neighbours 1-2, 3-4, ... share a half
    grouped = bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=order, tolerance=0.05,
                                              skip_grid=grid, continuations=CONTINUATIONS, continuation_tokens=tokens,
                                              groups=groups).calibration
    assert cal.target == "continuation" and sum(cal.prompts_per_band) == len(PROMPTS)
    assert grouped.measured == cal.measured and grouped.halves != cal.halves
    bands = [router.band(bypass.prompt_features(model, CharTokenizer()(p)["input_ids"])) for p in PROMPTS]
    assert [bands.count(b) for b in range(3)] == cal.prompts_per_band
    for b in range(3):
        members = [i for i, band in enumerate(bands) if band == b]
        for k in grid:
            inc = torch.tensor([_continuation_loss_by_hand(model, PROMPTS[i], CONTINUATIONS[i], order[:k], tokens)
                                - _continuation_loss_by_hand(model, PROMPTS[i], CONTINUATIONS[i], [], tokens)
                                for i in members])
            assert abs(inc.mean().item() - cal.measured[str(b)][str(k)]) < 2e-4
            assert abs(inc.std().item() / len(members) ** 0.5 - cal.measured_se[str(b)][str(k)]) < 2e-4
            residual = inc - inc.mean()  # grouped: neighbours share a cluster (cluster-robust standard error)
            sums = [residual[[j for j, i in enumerate(members) if groups[i] == g]].sum().item()
                    for g in sorted({groups[i] for i in members})]
            clustered = (sum(x * x for x in sums) * len(sums) / (len(sums) - 1)) ** 0.5 / len(members)
            assert abs(clustered - grouped.measured_se[str(b)][str(k)]) < 2e-4
            for h in (0, 1):  # default: every prompt its own group, so halves by index parity
                for halves, half_of in ((cal.halves, lambda i: i % 2), (grouped.halves, lambda i: groups[i] % 2)):
                    rows = inc[[j for j, i in enumerate(members) if half_of(i) == h]]
                    assert abs(rows.mean().item() - halves[h][str(b)][str(k)]) < 2e-4
    assert cal.skip_per_band == bypass.skips_for(cal.measured, 0.05)
    assert bypass.RouterCalibration.load(cal.save(tmp_path / "router.json")) == cal
    moved = cal.with_tolerance(0.5)
    assert moved.skip_per_band == bypass.skips_for(cal.measured, 0.5) and moved.tolerance == 0.5
    assert cal.tolerance == 0.05 and moved.measured == cal.measured  # a copy: the original is untouched
    candidates = [t / 100 for t in range(-5, 60)]
    assert cal.stable_tolerances(candidates) == [
        t for t in candidates if all(bypass.skips_for(h, t) == bypass.skips_for(cal.measured, t) for h in cal.halves)]
    with pytest.raises(ValueError, match="no halves"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=order,
                                        skip_grid=grid).calibration.stable_tolerances([0.1])


def test_router_continuations_bad_input_leaves_nothing_behind():
    model = tiny_llama(num_hidden_layers=4)
    with pytest.raises(ValueError, match="one text per prompt"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3], continuations=CONTINUATIONS[:3])
    with pytest.raises(ValueError, match="continuation 1 is empty"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3],
                                        continuations=[" a", ""] + CONTINUATIONS[2:])
    with pytest.raises(ValueError, match="one entry per prompt"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3], continuations=CONTINUATIONS,
                                        groups=[0])
    with pytest.raises(ValueError, match="more groups"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3], continuations=CONTINUATIONS,
                                        groups=[0] * len(PROMPTS))
    with pytest.raises(ValueError, match="continuation_tokens"):
        bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3], continuations=CONTINUATIONS,
                                        continuation_tokens=0)
    assert not any(isinstance(m, bypass.AttentionBypass) for m in model.modules())


def test_choose_bypass_returns_the_order_of_choice():
    """Least important first, so ``order[:k]`` is the k-layer choice (what AdaptiveBypass.calibrate needs)."""
    model = tiny_llama(num_hidden_layers=4)
    zero_attention_output(model, 3)
    chosen = bypass.choose_bypass(model, [padded_batch()], 3)
    assert chosen[0] == 3 and len(set(chosen)) == 3
    assert bypass.choose_bypass(model, [padded_batch()], 1) == chosen[:1]
    one_shot = bypass.choose_bypass(model, [padded_batch()], 3, iterative=False)
    scores = importance.attention_importance(model, [padded_batch()])
    assert one_shot == scores.argsort()[:3].tolist()


def test_router_records_the_model_name_and_accepts_a_grid_without_zero():
    model = tiny_llama(num_hidden_layers=4)
    router = bypass.AdaptiveBypass.calibrate(model, CharTokenizer(), PROMPTS, order=[3, 1], skip_grid=[2],
                                             tolerance=-1.0, model_name="tiny/llama")
    assert router.calibration.model == "tiny/llama"
    assert router.calibration.skip_per_band == [0, 0, 0]  # nothing within a negative tolerance: skip nothing


def test_cut_prompts_is_seeded_and_keeps_the_text():
    paragraphs = [" ".join(f"w{i}_{j}" for j in range(200)) for i in range(10)]
    pairs = data.cut_prompts(paragraphs, 6, seed=3)
    assert pairs == data.cut_prompts(paragraphs, 6, seed=3) != data.cut_prompts(paragraphs, 6, seed=4)
    for prompt, rest in pairs:
        assert len(prompt.split()) in data.PROMPT_LENGTHS and (prompt + rest) in paragraphs
    with pytest.raises(ValueError, match="n must be in"):
        data.cut_prompts(paragraphs, 11, seed=0)
    every = data.cut_every_length(paragraphs[:3])
    assert len(every) == 3 * len(data.PROMPT_LENGTHS)
    for i, (prompt, rest) in enumerate(every):
        assert prompt + rest == paragraphs[i // len(data.PROMPT_LENGTHS)]
        assert len(prompt.split()) == data.PROMPT_LENGTHS[i % len(data.PROMPT_LENGTHS)]
    with pytest.raises(ValueError, match="more than 128 words"):
        data.cut_every_length(paragraphs[:2] + ["too short"])


def test_shipped_router_calibration_is_smollm2s(smollm2):
    """Lesson 06 loads data/adaptive_bypass_smollm2.json instead of recalibrating (minutes of forward passes):
    recompute its features, thresholds and bands exactly, and one cell of half 0 (half of band 0's prompts)."""
    from course_utils import likelihood

    model, tokenizer = smollm2
    shipped = bypass.RouterCalibration.load(Path(bypass.__file__).resolve().parent.parent / "data"
                                            / "adaptive_bypass_smollm2.json")
    long_paragraphs = [p for p in data.load_texts("calibration", "offline") if len(p.split()) >= 170]
    pairs = data.cut_every_length(long_paragraphs)
    encoded = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p, _ in pairs]
    feats = [bypass.prompt_features(model, ids) for ids in encoded]
    raw = torch.tensor([[torch.tensor(f.n_tokens).log().item(), torch.tensor(f.embedding_variance).log().item()]
                        for f in feats])
    assert torch.allclose(raw.mean(0), torch.tensor(shipped.feature_mean), rtol=1e-5)
    assert torch.allclose(raw.std(0), torch.tensor(shipped.feature_std), rtol=1e-5)
    assert shipped.target == "continuation" and len(shipped.halves) == 2
    router = bypass.AdaptiveBypass(model, shipped)
    bands = [router.band(f) for f in feats]
    assert [bands.count(b) for b in range(3)] == shipped.prompts_per_band
    paragraph = [i // len(data.PROMPT_LENGTHS) for i in range(len(pairs))]  # halves: paragraph parity
    rows = [i for i, b in enumerate(bands) if b == 0 and paragraph[i] % 2 == 0]
    items = [(encoded[i][0].tolist(), tokenizer(pairs[i][1], add_special_tokens=False)["input_ids"][:32]) for i in rows]
    base = likelihood.continuation_logprob(model, items)
    with bypass.skipping(model, shipped.order[:4]):
        skipped = likelihood.continuation_logprob(model, items)
    increase = ((base - skipped) / 32).mean().item()
    assert abs(increase - shipped.halves[0]["0"]["4"]) < 2e-4


def test_skips_for_applies_the_calibration_rule_to_a_table():
    measured = {"0": {"0": 0.0, "2": 0.05, "4": 0.04, "6": 0.3},  # noisy: 4 costs less than 2
                "1": {"0": 0.0, "2": 0.02, "4": 0.12, "6": 0.2},
                "2": {"0": 0.0, "2": 0.2, "4": 0.3, "6": 0.4}}
    assert bypass.skips_for(measured, 0.1) == [4, 2, 0]  # the largest count within the tolerance, per band
    assert bypass.skips_for(measured, 0.25) == [4, 4, 2]  # band 1 could take 6: capped by the simpler band
    assert bypass.skips_for(measured, -1.0) == [0, 0, 0]  # nothing within: skip nothing
    assert bypass.skips_for({"1": measured["1"], "0": measured["0"]}, 0.1) == [4, 2]  # bands in numeric order
    with pytest.raises(ValueError, match="measured is empty"):
        bypass.skips_for({}, 0.1)


def test_widest_parted_run_needs_both_halves_and_one_plan():
    # full table: [2, 0] from 0.10 to 0.19, [2, 2] to 0.29, [4, 2] from 0.30 to 0.39, then [4, 4]
    table = {"0": {"0": 0.0, "2": 0.1, "4": 0.3}, "1": {"0": 0.0, "2": 0.2, "4": 0.4}}
    # one half: [2, 0] to 0.14 only, and [4, 2] to 0.36 only
    half_a = {"0": {"0": 0.0, "2": 0.1, "4": 0.3}, "1": {"0": 0.0, "2": 0.15, "4": 0.37}}
    cal = bypass.RouterCalibration(model="m", order=[0, 1, 2, 3], feature_mean=[0, 0], feature_std=[1, 1],
                                   weights=[0.5, 0.5], thresholds=[0.0], skip_per_band=[0, 0], tolerance=0.0,
                                   measured=table, target="continuation", halves=[half_a, table])
    candidates = [t / 100 for t in range(0, 50)]
    assert cal.widest_parted_run(candidates) == [t / 100 for t in range(30, 37)]
    assert cal.widest_parted_run([0.25, 0.45]) == []  # [2, 2] and [4, 4]: the bands do not part
    agreeing = bypass.RouterCalibration(**{**cal.__dict__, "halves": [table, table]})
    assert agreeing.widest_parted_run(candidates) == [t / 100 for t in range(10, 20)]  # a tie: the first run


def test_shipped_calibration_follows_the_rule_and_parts_at_other_tolerances():
    shipped = bypass.RouterCalibration.load(Path(__file__).resolve().parent.parent / "data" /
                                            "adaptive_bypass_smollm2.json")
    assert bypass.skips_for(shipped.measured, shipped.tolerance) == shipped.skip_per_band
    parted = [t / 100 for t in range(1, 61) if len(set(bypass.skips_for(shipped.measured, t / 100))) > 1]
    assert parted  # lesson 06 shows these tolerances: the bands part there
    # lesson 06's choice: the middle of the widest run over which the bands part and both halves give the plan
    run = shipped.widest_parted_run([t / 100 for t in range(5, 61)])
    assert shipped.tolerance == run[len(run) // 2] and len(set(shipped.skip_per_band)) > 1
