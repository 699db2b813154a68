"""What a demographic term changes inside a model: activations and predictions of contrastive pairs.

A pair is two prompts that differ only in the term (``course_utils.bias_pairs``). After tokenizing,
the prompts share a prefix (before the term) and a suffix (after it); the two terms may take a
different number of tokens. The comparison is made on the **shared suffix**, aligned from the end:
the same words, read by the model once after each term, so every difference there was caused by the
term. When the term ends the prompt there is no suffix and the last token of each prompt is used.
No pair is ever dropped for unequal lengths.

Measured quantities (all zero for identical prompts and symmetric in the order of the pair):
- ``activation_differences``: per layer and MLP neuron, the mean over pairs of |a_A - a_B|, where
  a is the neuron's activation averaged over the aligned positions (the input of down_proj / c_proj);
- ``internal_bias``: per layer, the mean over pairs of the relative distance
  2 ||a_A - a_B|| / (||a_A|| + ||a_B||) between the two activation vectors, a scale-free number;
- ``next_token_shift``: per pair, the Jensen-Shannon divergence (nats) between the model's next-token
  distributions after the two prompts, an output-level measure that needs no labels.
Prompts run in right-padded batches; padding never enters a number (tested against one prompt at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import hooks


@dataclass
class PairActivations:
    """MLP activations of both prompts of each pair, averaged over the aligned positions."""

    layers: list[int]
    a: torch.Tensor  # (layers, pairs, width): first prompt of each pair
    b: torch.Tensor  # (layers, pairs, width): second prompt

    @property
    def difference(self) -> torch.Tensor:
        """(layers, pairs, width) signed difference a - b."""
        return self.a - self.b


def encode_pairs(tokenizer, pairs: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Token ids of both prompts of each pair (rows of ``bias_pairs.load``), without special tokens."""
    encoded = []
    for pair in pairs:
        first, second = pair["prompts"]
        encoded.append((tokenizer(first, add_special_tokens=False)["input_ids"],
                        tokenizer(second, add_special_tokens=False)["input_ids"]))
    return encoded


def aligned_positions(ids_a: list[int], ids_b: list[int]) -> tuple[list[int], list[int]]:
    """Positions of the shared suffix after the first differing token, in each prompt (aligned from the end)."""
    if not ids_a or not ids_b:
        raise ValueError("a prompt of the pair has no tokens")
    if list(ids_a) == list(ids_b):  # identical prompts: every position is shared
        return list(range(len(ids_a))), list(range(len(ids_b)))
    prefix = 0
    while prefix < min(len(ids_a), len(ids_b)) and ids_a[prefix] == ids_b[prefix]:
        prefix += 1
    suffix = 0
    limit = min(len(ids_a), len(ids_b)) - prefix
    while suffix < limit and ids_a[-1 - suffix] == ids_b[-1 - suffix]:
        suffix += 1
    n = max(suffix, 1)  # no shared suffix: compare the last token of each
    return list(range(len(ids_a) - n, len(ids_a))), list(range(len(ids_b) - n, len(ids_b)))


def _batches(sequences: list[list[int]], batch_size: int, pad_id: int):
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        yield {"input_ids": ids, "attention_mask": mask}


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


@torch.no_grad()
def pair_activations(model: nn.Module, encoded: list[tuple[list[int], list[int]]], layers=None,
                     batch_size: int = 16) -> PairActivations:
    """MLP intermediate activations of both prompts of every pair, averaged over their aligned positions."""
    if not encoded:
        raise ValueError("no pairs: pass encode_pairs(tokenizer, bias_pairs.load(...))")
    sequences = [list(ids) for pair in encoded for ids in pair]  # a0, b0, a1, b1, ...
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(max(s) for s in sequences) >= vocab:
        raise ValueError(f"token ids exceed the model's vocabulary ({vocab}): encode with this model's tokenizer")
    positions = [p for a, b in encoded for p in aligned_positions(a, b)]
    with hooks.capture_mlp_activations(model, layers=layers, keep=True) as tap:
        tap.run(model, _batches(sequences, batch_size, _pad_id(model)))
    lengths = [len(s) for s in sequences]
    means = []
    for index in tap.layers:
        rows = torch.split(tap.cat(index), lengths)  # one (length, width) block per prompt
        means.append(torch.stack([block[pos].float().mean(0) for block, pos in zip(rows, positions, strict=True)]))
    stacked = torch.stack(means)  # (layers, 2 * pairs, width)
    return PairActivations(layers=list(tap.layers), a=stacked[:, 0::2].cpu(), b=stacked[:, 1::2].cpu())


def activation_differences(acts: PairActivations) -> torch.Tensor:
    """(layers, width): mean over pairs of |a_A - a_B| per neuron (how strongly each neuron reacts to the term)."""
    return acts.difference.abs().mean(1)


def internal_bias(acts: PairActivations) -> torch.Tensor:
    """(layers,): mean over pairs of 2 ||a_A - a_B|| / (||a_A|| + ||a_B||) (0 = the term changes nothing)."""
    distance = acts.difference.norm(dim=-1)
    scale = (acts.a.norm(dim=-1) + acts.b.norm(dim=-1)).clamp_min(1e-12)
    return (2 * distance / scale).mean(1)


@torch.no_grad()
def next_token_shift(model: nn.Module, encoded: list[tuple[list[int], list[int]]], batch_size: int = 16
                     ) -> torch.Tensor:
    """(pairs,): Jensen-Shannon divergence (nats) between the next-token distributions after each prompt."""
    if not encoded:
        raise ValueError("no pairs: pass encode_pairs(tokenizer, bias_pairs.load(...))")
    sequences = [list(ids) for pair in encoded for ids in pair]
    device = next(model.parameters()).device
    last = []
    for batch in _batches(sequences, batch_size, _pad_id(model)):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, use_cache=False).logits  # (batch, seq, vocab)
        ends = batch["attention_mask"].sum(1) - 1
        last.append(F.log_softmax(logits[torch.arange(len(ends)), ends].float(), dim=-1).cpu())
    log_p = torch.cat(last)
    log_a, log_b = log_p[0::2], log_p[1::2]
    log_m = torch.logsumexp(torch.stack([log_a, log_b]), dim=0) - torch.log(torch.tensor(2.0))
    kl_a = (log_a.exp() * (log_a - log_m)).sum(-1)
    kl_b = (log_b.exp() * (log_b - log_m)).sum(-1)
    return (0.5 * (kl_a + kl_b)).clamp_min(0.0)

