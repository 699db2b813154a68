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
  distributions after the two prompts, an output-level measure that needs no labels;
- ``stereotype_preference``: per held-out gender / age pair, a CrowS-Pairs-style double difference of
  log-likelihoods: is each stereotyped continuation likelier after its own group's prompt than after the
  other's? (0 = no preference; the share above 0 is 50 % for a model without one);
- ``specific_reaction``: per neuron, the reaction to demographic swaps minus the reaction to control swaps
  (ordinary adjectives in the same frames), over the neuron's typical |activation| (lesson 08, section 3).
``measure_pairs`` gives the activations and the next-token shift from one forward pass per prompt.
Prompts run in right-padded batches; padding never enters a number (tested against one prompt at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import hooks
from .data import to_device
from .likelihood import continuation_logprob, pad_id, padded_batches


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

    def subset(self, index: list[int]) -> PairActivations:
        """The pairs at ``index`` (e.g. one category's rows)."""
        return PairActivations(self.layers, self.a[:, index], self.b[:, index])

    @property
    def scale(self) -> torch.Tensor:
        """(layers, width): each neuron's typical |activation| over both prompts of every pair."""
        return (self.a.abs().mean(1) + self.b.abs().mean(1)) / 2


def category_index(rows: list[dict], names) -> list[int]:
    """Positions of the rows (pairs) whose category is in ``names``."""
    names = {names} if isinstance(names, str) else set(names)
    return [i for i, row in enumerate(rows) if row["category"] in names]


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


def _check_encoded(model: nn.Module, encoded: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    if not encoded:
        raise ValueError("no pairs: pass encode_pairs(tokenizer, bias_pairs.load(...))")
    sequences = [list(ids) for pair in encoded for ids in pair]  # a0, b0, a1, b1, ...
    vocab = model.get_input_embeddings().weight.shape[0]
    if max(max(s) for s in sequences) >= vocab:
        raise ValueError(f"token ids exceed the model's vocabulary ({vocab}): encode with this model's tokenizer")
    return sequences


@torch.no_grad()
def measure_pairs(model: nn.Module, encoded: list[tuple[list[int], list[int]]], layers=None,
                  batch_size: int = 16, site: str = "mlp") -> tuple[PairActivations, torch.Tensor]:
    """(activations on the aligned positions, next-token JS shift per pair), from one pass per prompt.

    ``site="mlp"``: the MLP intermediate activations (one number per neuron); ``site="residual"``: each
    decoder layer's output hidden state, whose size no MLP pruning changes (compare models pruned
    differently there: a neuron that was removed cannot lower the average by being absent);
    ``site="attention"``: what each attention sub-layer adds to the residual stream.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {tuple(SITES)}; got {site!r}")
    sequences = _check_encoded(model, encoded)
    positions = [p for a, b in encoded for p in aligned_positions(a, b)]
    last = []
    with SITES[site](model, layers=layers, keep=True) as tap:
        for batch in padded_batches(sequences, batch_size, pad_id(model)):
            tap.set_mask(batch["attention_mask"])
            batch = to_device(batch, model)
            ends = batch["attention_mask"].sum(1) - 1  # right padding: the last real token of each row
            # logits only where they are used (the vocabulary projection is a fifth of this small model's work)
            logits = model(**batch, use_cache=False, logits_to_keep=ends[:, None]).logits  # (batch, 1, vocab)
            last.append(F.log_softmax(logits[:, 0].float(), dim=-1).cpu())
        tap.mask = None
    lengths = [len(s) for s in sequences]
    means = []
    for index in tap.layers:
        kept = tap.cat(index)
        kept = kept[1] if isinstance(kept, tuple) else kept  # layer taps keep (inputs, outputs): the outputs
        rows = torch.split(kept, lengths)  # one (length, width) block per prompt
        means.append(torch.stack([block[pos].float().mean(0) for block, pos in zip(rows, positions, strict=True)]))
    stacked = torch.stack(means)  # (layers, 2 * pairs, width)
    acts = PairActivations(layers=list(tap.layers), a=stacked[:, 0::2].cpu(), b=stacked[:, 1::2].cpu())
    log_p = torch.cat(last)  # (2 * pairs, vocab)
    return acts, _js(log_p[0::2], log_p[1::2])


SITES = {"mlp": hooks.capture_mlp_activations, "residual": hooks.capture_layer_io,
         "attention": hooks.capture_attention_outputs}


def _js(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between rows of two log-probability tables."""
    log_m = torch.logsumexp(torch.stack([log_a, log_b]), dim=0) - torch.log(torch.tensor(2.0))
    kl_a = (log_a.exp() * (log_a - log_m)).sum(-1)
    kl_b = (log_b.exp() * (log_b - log_m)).sum(-1)
    return (0.5 * (kl_a + kl_b)).clamp_min(0.0)


def pair_activations(model: nn.Module, encoded: list[tuple[list[int], list[int]]], layers=None,
                     batch_size: int = 16) -> PairActivations:
    """MLP intermediate activations of both prompts of every pair, averaged over their aligned positions."""
    return measure_pairs(model, encoded, layers, batch_size)[0]


def next_token_shift(model: nn.Module, encoded: list[tuple[list[int], list[int]]], batch_size: int = 16
                     ) -> torch.Tensor:
    """(pairs,): Jensen-Shannon divergence (nats) between the next-token distributions after each prompt."""
    return measure_pairs(model, encoded, layers=[0], batch_size=batch_size)[1]


def activation_differences(acts: PairActivations) -> torch.Tensor:
    """(layers, width): mean over pairs of |a_A - a_B| per neuron (how strongly each neuron reacts to the term)."""
    return acts.difference.abs().mean(1)


def internal_bias(acts: PairActivations) -> torch.Tensor:
    """(layers,): mean over pairs of 2 ||a_A - a_B|| / (||a_A|| + ||a_B||) (0 = the term changes nothing)."""
    distance = acts.difference.norm(dim=-1)
    scale = (acts.a.norm(dim=-1) + acts.b.norm(dim=-1)).clamp_min(1e-12)
    return (2 * distance / scale).mean(1)


def specific_reaction(demographic: PairActivations, control: PairActivations, eps: float = 1e-6) -> torch.Tensor:
    """(layers, width): mean |a - b| over demographic pairs minus over control pairs, over typical |activation|.

    Positive where a neuron reacts to demographic terms more than to any ordinary word swap. The scale is
    taken over both sets of pairs, so layers with large activations do not rank first by size alone.
    """
    if demographic.layers != control.layers:
        raise ValueError("demographic and control activations cover different layers: measure them together")
    scale = (demographic.scale * demographic.a.shape[1] + control.scale * control.a.shape[1]) \
        / (demographic.a.shape[1] + control.a.shape[1])
    return (activation_differences(demographic) - activation_differences(control)) / (scale + eps)


def encode_continuations(tokenizer, pairs: list[dict]) -> list[tuple[list[int], ...]]:
    """(prompt A, prompt B, continuation A, continuation B) ids of each pair that has ``continuations``.

    Prompt and continuation are encoded separately and joined (as lm-eval does), so the continuation's
    tokens are the same after either prompt.
    """
    encoded = []
    for pair in pairs:
        if "continuations" not in pair:
            continue
        texts = [*pair["prompts"], *pair["continuations"]]
        encoded.append(tuple(tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts))
    if not encoded:
        raise ValueError("no pair has continuations: use the held-out gender and age pairs of bias_pairs.load")
    return encoded


def stereotype_preference(model: nn.Module, encoded: list[tuple[list[int], ...]], batch_size: int = 32
                          ) -> torch.Tensor:
    """(pairs,): [log p(S_A | A) - log p(S_A | B)] + [log p(S_B | B) - log p(S_B | A)] in nats.

    S_A is the continuation that states a stereotype about A's group (``encode_continuations``). Positive:
    the model ties each stereotype to its own group; the double difference cancels how likely a continuation
    is in general and how a term shifts every continuation. Symmetric in the order of the pair.
    """
    _check_encoded(model, [(a, b) for a, b, *_ in encoded] + [(sa, sb) for _, _, sa, sb in encoded])
    items = [item for a, b, sa, sb in encoded for item in ((a, sa), (b, sa), (b, sb), (a, sb))]
    lp = continuation_logprob(model, items, batch_size).view(-1, 4)
    return (lp[:, 0] - lp[:, 1]) + (lp[:, 2] - lp[:, 3])
