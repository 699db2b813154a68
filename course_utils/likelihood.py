"""Log-likelihood of a continuation given its context, batched and padded: what lm-eval calls a loglikelihood request.

Lessons 08-09 compare continuations after two prompts (``bias.stereotype_preference``); lesson 06 measures what
skipping attention costs on the text that follows a prompt (``bypass.AdaptiveBypass.calibrate``). Both score many
(context, continuation) pairs of different lengths, so rows of similar length share a right-padded batch and the
model projects only the positions that predict a continuation token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import to_device


def padded_batches(sequences: list[list[int]], batch_size: int, pad_id: int):
    """Right-padded {"input_ids", "attention_mask"} batches of ``batch_size`` token-id lists, in order."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        yield {"input_ids": ids, "attention_mask": mask}


def pad_id(model: nn.Module) -> int:
    """The model's pad token id (0 when its config has none: padding is masked, its id never matters)."""
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


@torch.no_grad()
def continuation_logprob(model: nn.Module, items: list[tuple[list[int], list[int]]], batch_size: int = 32
                         ) -> torch.Tensor:
    """(items,): log p(continuation | context) in nats, summed over the continuation's tokens."""
    if not items or any(not context or not continuation for context, continuation in items):
        raise ValueError("every item needs a non-empty context and continuation")
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]), len(items[i][1])))  # similar rows batch
    sequences = [list(items[i][0]) + list(items[i][1]) for i in order]
    scores = torch.empty(len(items))
    for start, batch in zip(range(0, len(items), batch_size), padded_batches(sequences, batch_size, pad_id(model)),
                            strict=True):
        rows = order[start:start + batch_size]
        width = max(len(items[i][1]) for i in rows)
        # position t predicts token t + 1: the continuation is predicted from len(context) - 1 on
        at = torch.tensor([[len(items[i][0]) - 1 + min(k, len(items[i][1]) - 1) for k in range(width)] for i in rows])
        targets = batch["input_ids"].gather(1, at + 1)
        logits = model(**to_device(batch, model), use_cache=False, logits_to_keep=to_device(at, model)).logits
        picked = F.log_softmax(logits.float(), dim=-1).cpu().gather(-1, targets[..., None])[..., 0]
        for row, i in enumerate(rows):
            scores[i] = picked[row, :len(items[i][1])].sum()  # positions past a shorter continuation repeat its last
    return scores
