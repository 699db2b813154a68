"""Model loading, the SmolLM2 cache, anatomy; integration tests on the offline Llama stand-in."""

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_gpt2, tiny_llama, word_tokenizer

from course_utils import data, evaluation, models

# Measured on the offline profile (4,096 held-out tokens, windows of 512, 2-core CPU, fp32):
# SmolLM2-135M-Instruct gives PPL 15.48 and last-word accuracy 0.54 on the first 100 items.
# The bands leave room for other CPUs/BLAS builds but would catch a broken loader or tokenizer.
SMOLLM2_PPL_BAND = (12.0, 20.0)
SMOLLM2_LASTWORD_BAND = (0.35, 0.75)


def test_count_parameters_counts_tied_weights_once():
    model = tiny_llama(tie_word_embeddings=True)
    assert models.count_parameters(model) == sum(p.numel() for p in model.parameters())
    untied = tiny_llama(tie_word_embeddings=False)
    assert models.count_parameters(untied) == models.count_parameters(model) + 100 * 32


def test_describe_partitions_all_parameters(tiny_model):
    anatomy = models.describe(tiny_model)
    assert anatomy.total == models.count_parameters(tiny_model)
    assert anatomy.groups["other"] == 0
    assert len(anatomy.per_layer) == 2
    assert sum(layer["mlp"] for layer in anatomy.per_layer) == anatomy.groups["mlp"]
    assert "parameters" in str(anatomy)


def test_gpt2_mlp_share():
    anatomy = models.describe(tiny_gpt2())
    # GPT-2 MLP per layer: c_fc 32x128 + 128, c_proj 128x32 + 32
    assert anatomy.per_layer[0]["mlp"] == 32 * 128 + 128 + 128 * 32 + 32


def test_neuron_parameters_is_what_removing_one_neuron_takes(tiny_model):
    import torch

    from course_utils import allocation, anatomy, arch, surgery

    before = models.count_parameters(tiny_model)
    width = arch.mlp_parts(tiny_model, 0).width
    surgery.remove_mlp_neurons(tiny_model, {0: torch.arange(1, width)})
    assert before - models.count_parameters(tiny_model) == anatomy.neuron_parameters(tiny_model, 0)
    per_neuron = anatomy.neuron_parameters(tiny_model, 1)
    kept = allocation.width_for_budget(width, 2 * 5 * per_neuron, 2, per_neuron)
    assert kept == width - 5  # five neurons in each of two layers
    assert allocation.width_for_budget(width, 2 * 5 * per_neuron, 2, per_neuron, multiple_of=8) % 8 == 0
    assert allocation.width_for_budget(width, 10**12, 2, per_neuron) == 1  # never below one neuron
    with pytest.raises(ValueError):
        allocation.width_for_budget(width, -1, 2, per_neuron)


def test_unknown_role_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model role 'lama'"):
        models.load_model("lama", "offline")
    with pytest.raises(ValueError, match="role_or_id must be"):
        models.load_model("", "offline")


def test_gated_message_names_the_fix():
    message = models.hub_error_message("meta-llama/Llama-3.2-1B", OSError("401 Client Error: gated repo"))
    assert "accept its license" in message and "login" in message and "SmolLM2" in message


def test_atomic_directory_under_concurrency(tmp_path):
    """Two builders racing: exactly one complete directory, no temp leftovers."""
    target = tmp_path / "cache" / "model"
    calls = []

    def build(tmp: Path) -> None:
        calls.append(1)
        for i in range(5):
            (tmp / f"part{i}").write_text("x" * 1000)
            time.sleep(0.01)

    threads = [threading.Thread(target=models.atomic_directory, args=(target, build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in target.iterdir()) == [f"part{i}" for i in range(5)]
    assert [p.name for p in target.parent.iterdir()] == ["model"]
    models.atomic_directory(target, build)  # exists: nothing rebuilt
    assert len(calls) <= 2


@pytest.mark.integration
def test_smollm2_is_a_true_llama(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (1536, 9, 3)
    assert models.count_parameters(model) == 134_515_008
    assert 0.55 < models.describe(model).share("mlp") < 0.62
    assert not model.training


@pytest.mark.integration
def test_smollm2_decoder_weights_sit_on_a_4bit_grid(smollm2):
    """What lesson 00 and the README say about the offline Llama: it was dequantized from Q4_1 (at most 16 values
    per block of 32 weights in the decoder layers), while the embeddings were stored more finely."""
    model, _ = smollm2
    for weight in (model.model.layers[3].mlp.up_proj.weight, model.model.layers[20].self_attn.q_proj.weight):
        blocks = weight.detach().reshape(-1, 32)[:1024]
        assert max(block.unique().numel() for block in blocks) <= 16
    embedding = model.model.embed_tokens.weight.detach().reshape(-1, 32)[:1024]
    assert max(block.unique().numel() for block in embedding) > 16


@pytest.mark.integration
def test_smollm2_cache_is_reused(smollm2):
    cached = models.smollm2_dir()
    stamp = os.path.getmtime(cached / "model.safetensors")
    start = time.perf_counter()
    models.load_model("llama", "offline")
    assert os.path.getmtime(cached / "model.safetensors") == stamp  # not rebuilt
    assert time.perf_counter() - start < 15  # the GGUF conversion alone takes ~20 s


@pytest.mark.integration
def test_smollm2_held_out_quality(smollm2):
    model, tokenizer = smollm2
    ppl = evaluation.perplexity(model, tokenizer, data.load_texts("evaluation"), max_tokens=4096)
    assert SMOLLM2_PPL_BAND[0] < ppl < SMOLLM2_PPL_BAND[1], ppl
    acc = evaluation.last_word_accuracy(model, tokenizer, evaluation.lastword_items("offline")[:50])
    assert SMOLLM2_LASTWORD_BAND[0] < acc < SMOLLM2_LASTWORD_BAND[1], acc


@pytest.mark.integration
def test_lm_eval_offline_tasks_agree_with_our_metric(smollm2):
    model, tokenizer = smollm2
    results = evaluation.run_lm_eval(model, tokenizer, profile="offline", limit=12)
    assert set(results) == {"course_lastword", "course_wikipedia"}
    ours = evaluation.last_word_accuracy(model, tokenizer, evaluation.lastword_items("offline")[:12])
    assert results["course_lastword"]["acc"] == pytest.approx(ours)
    assert 1 < results["course_wikipedia"]["word_perplexity"] < 500
    with pytest.raises(ValueError, match="offline lm-eval tasks"):
        evaluation.run_lm_eval(model, tokenizer, tasks=["boolq"], profile="offline")


@pytest.mark.integration
def test_generation_reads_as_text(smollm2):
    model, tokenizer = smollm2
    text = evaluation.generate(model, tokenizer, "The capital of France is", max_new_tokens=8)
    assert "Paris" in text


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("protect", [(), (0,)])
def test_save_pruned_reloads_with_identical_logits(tmp_path, family, protect):
    import torch
    from transformers import AutoModelForCausalLM

    from course_utils import surgery

    model = tiny_gpt2() if family == "gpt2" else tiny_llama()
    surgery.prune_mlp(model, 0.5, method="l2", protect=protect)
    tokenizer = word_tokenizer()
    path = models.save_pruned(model, tokenizer, tmp_path / "pruned", card={"method": "l2", "ratio": 0.5})
    ids = torch.randint(0, 100, (2, 12))
    reloaded, _ = models.load_pruned(path)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    card = (path / "README.md").read_text()
    assert "| method | l2 |" in card
    if protect:  # per-layer widths: a stock config cannot express them, and the card says so
        assert models.needs_custom_loader(reloaded.config) and "cannot build it" in card
        # What lesson 03 says plain from_pretrained does with them: it builds every layer at the config's one
        # width, reports the size mismatch and raises (it re-initialises only if told to ignore mismatches).
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(path)
    else:
        plain = AutoModelForCausalLM.from_pretrained(path)
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
        assert "plain `transformers.AutoModelForCausalLM.from_pretrained(path)`" in card
