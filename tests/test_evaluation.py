"""Perplexity, last-word accuracy and speed measurements: protocol, bad input, tables."""

import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from course_utils import evaluation


class CharTokenizer:
    """One token per character (ids 1..99), enough to test the evaluation protocol on tiny models."""

    pad_token_id = 0
    pad_token = "<pad>"
    eos_token = "<pad>"

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [1 + (ord(ch) % 99) for ch in text]
        return {"input_ids": torch.tensor([ids])} if return_tensors == "pt" else {"input_ids": ids}


def test_perplexity_protocol_matches_manual_computation():
    model, tok = tiny_gpt2(), CharTokenizer()
    texts = ["abcdefghij" * 3, "klmnopqrst" * 2]
    ids = tok("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    window = 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = ids[start:start + window]
            if len(chunk) < 2:
                continue
            logits = model(chunk[None]).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    expected = math.exp(nll / count)
    assert evaluation.perplexity(model, tok, texts, window=window, batch_size=2) == pytest.approx(expected, rel=1e-5)
    # a random 100-token model is close to uniform: PPL near the vocabulary size
    assert 50 < expected < 200


def test_perplexity_budget_truncates():
    model, tok = tiny_gpt2(), CharTokenizer()
    texts = ["abcdefghij" * 10]
    assert evaluation.perplexity(model, tok, texts, window=8, max_tokens=40) == pytest.approx(
        evaluation.perplexity(model, tok, ["abcdefghij" * 4], window=8))


@pytest.mark.parametrize("texts,window,message", [([], 8, "texts is empty"), (["  "], 8, "texts is empty"),
                                                  (["abc"], 1, "window must be >= 2")])
def test_perplexity_bad_input(texts, window, message):
    with pytest.raises(ValueError, match=message):
        evaluation.perplexity(tiny_gpt2(), CharTokenizer(), texts, window=window)


def test_lastword_items_need_the_word_in_context():
    paragraph = ("The river flows north through the valley and the river then turns east near the old mill "
                 "where farmers have ground grain for centuries and the water is clear and cold in every season "
                 "of the year, so people call it the river.")
    items = evaluation.build_lastword_items([paragraph])
    assert items == [{"context": paragraph[:-len("river.")].strip(), "target": "river"}]
    assert evaluation.build_lastword_items(["Too short to be an item, with the word short."]) == []


def test_last_word_accuracy_counts_greedy_matches():
    class Oracle(torch.nn.Module):
        """Always predicts the token id 7 ('x' in CharTokenizer when ord % 99 == 6)."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, logits_to_keep=None):
            shape = input_ids.shape if logits_to_keep is None else logits_to_keep.shape  # as transformers slices
            logits = torch.zeros(*shape, 100)
            logits[..., 7] = 1.0
            return type("Out", (), {"logits": logits})()

    tok = CharTokenizer()
    seven = chr(6 + 99)  # the character whose id is 7
    items = [{"context": "ab", "target": seven * 2}, {"context": "ab", "target": "zz"}]
    # the target is " " + word; the space token (id 1 + 32 % 99 = 33) is never predicted -> 0 correct
    assert evaluation.last_word_accuracy(Oracle(), tok, items) == 0.0
    with pytest.raises(ValueError, match="no last-word items"):
        evaluation.last_word_accuracy(Oracle(), tok, [])


def test_latency_reports_positive_medians_inside_their_range():
    timing = evaluation.latency(tiny_gpt2(), prompt_tokens=8, new_tokens=4, runs=3)
    assert timing.prefill_ms > 0 and timing.decode_tok_s > 0 and timing.runs == 3
    low, high = timing.prefill_ms_range
    assert 0 < low <= timing.prefill_ms <= high
    low, high = timing.decode_tok_s_range
    assert 0 < low <= timing.decode_tok_s <= high
    assert "median and range of 3 runs" in str(timing)


def test_markdown_table_ratios():
    rows = [evaluation.EvalRow("base", 100_000_000, 20.0, 0.5, 10.0, 20.0),
            evaluation.EvalRow("pruned", 80_000_000, 25.0, 0.4, 8.0, 25.0)]
    table = evaluation.markdown_table(rows, base="base")
    assert "| pruned | 80.0 | 25.00 | 0.400 | 8.0 | 25.0 | 0.80x | 1.25x | 1.25x |" in table
    with pytest.raises(ValueError, match="base row 'nope'"):
        evaluation.markdown_table(rows, base="nope")


def test_evaluate_model_budgets():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # enough positions for character-level last-word items
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100, n_positions=1024)).eval()
    tok = CharTokenizer()
    texts = ["abcdefghij" * 20]
    row = evaluation.evaluate_model(model, tok, "tiny", "offline", texts=texts, speed=False, max_tokens=64,
                                    n_items=5)
    assert row.ppl == pytest.approx(evaluation.perplexity(model, tok, texts, max_tokens=64))
    assert row.params == sum(p.numel() for p in model.parameters()) and row.prefill_ms is None
    assert 0.0 <= row.lastword_acc <= 1.0


def test_forward_flops_counts_attention_and_restores_the_setting():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    counted = evaluation.forward_flops(model, tokens=16)
    with FlopCounterMode(display=False) as fused, torch.no_grad():
        model(torch.randint(0, 100, (1, 16)))
    assert counted > fused.get_total_flops() > 0  # the fused kernel's attention goes uncounted
    assert model.config._attn_implementation == "sdpa"  # noqa: SLF001 (where transformers keeps the choice)
    assert evaluation.forward_flops(model, tokens=32) > 2 * counted  # attention grows faster than linearly


def test_perplexity_spread_scores_each_document_and_pools_by_tokens():
    model, tok = tiny_gpt2(), CharTokenizer()
    documents = [["abcdefghij" * 5], ["klmnopqrst" * 2, "uvwxyz" * 3], ["0123456789" * 4]]
    spread = evaluation.perplexity_spread(model, tok, documents, tokens_per_document=30, window=16)
    for doc, value in zip(documents, spread.per_document, strict=True):
        assert value == pytest.approx(evaluation.perplexity(model, tok, doc, window=16, max_tokens=30), rel=1e-6)
    assert spread.tokens == [15 + 13, 15 + 13, 15 + 13]  # 30 tokens: windows of 16 and 14, first token of each unscored
    pooled = math.exp(sum(n * t for n, t in zip(spread.nll, spread.tokens, strict=True)) / sum(spread.tokens))
    assert spread.ppl == pytest.approx(pooled) and spread.se_log_ppl > 0
    assert spread.difference(spread) == (0.0, 0.0)
    other = evaluation.perplexity_spread(tiny_gpt2(seed=1), tok, documents, tokens_per_document=30, window=16)
    diff, se = other.difference(spread)
    assert diff == pytest.approx(statistics_mean([a - b for a, b in zip(other.nll, spread.nll, strict=True)]))
    assert se > 0
    with pytest.raises(ValueError, match="non-empty"):
        evaluation.perplexity_spread(model, tok, [])
    with pytest.raises(ValueError, match="same documents"):
        spread.difference(evaluation.perplexity_spread(model, tok, documents[:2], tokens_per_document=30))


def statistics_mean(values):
    return sum(values) / len(values)


def test_latency_prefill_computes_logits_for_the_last_position_only_as_generate_does():
    model = tiny_gpt2()
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        evaluation.latency(model, prompt_tokens=8, new_tokens=2, runs=1, warmup=0)
    finally:
        handle.remove()
    assert shapes[0] == (1, 1, model.config.vocab_size)  # the prompt's pass: one position, not eight
    assert all(shape[1] == 1 for shape in shapes)
