"""Attention bypass: skip the attention sub-layers that matter least, statically or per prompt.

He et al. 2024 ("What Matters in Transformers? Not All Attention is Needed") measured that many
attention sub-layers barely turn the residual stream (``importance.attention_importance``) and can be
skipped while the MLPs stay. A bypassed sub-layer here truly skips: the decoder layer's residual
stream passes through unchanged (``h + 0``), no q/k/v/o projection or attention runs, and the KV cache
stores no keys or values for it, only a one-number-per-token placeholder so the cache still counts
positions (transformers asks layer 0's cache how many tokens it has seen).

Two ways to use it:
- static: ``bypass_attention(model, layers)`` swaps the attention modules for ``AttentionBypass``
  (weights dropped; the structure record ``bypassed_attention``, registered below, lets
  ``models.load_pruned`` rebuild it; plain ``from_pretrained`` cannot);
- adaptive: ``AdaptiveBypass`` keeps every weight and decides per prompt how many sub-layers to skip,
  from the prompt's complexity (length and embedding variance) and thresholds in a calibration file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import arch, evaluation, likelihood, structure
from .anatomy import count_parameters
from .data import require_batches
from .importance.attention import attention_importance

CALIBRATION_VERSION = 1


class AttentionBypass(nn.Module):
    """Stands in for a self-attention module: adds nothing to the residual stream and computes nothing.

    ``inner`` (optional) is the original attention, kept by the adaptive router; it runs only while
    ``active`` is False. Without ``inner`` the bypass is permanent (static bypass).
    """

    def __init__(self, layer_idx: int, inner: nn.Module | None = None):
        super().__init__()
        self.layer_idx = layer_idx  # the KV-cache slot this layer owns
        self.inner = inner
        self.active = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.inner is not None and not self.active:
            return self.inner(hidden_states, *args, **kwargs)
        # The KV cache arrives as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier 5.x).
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            batch, seq = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)  # (batch, 1 head, seq, 1 dim): counts tokens
            cache.update(placeholder, placeholder, self.layer_idx)
        zeros = hidden_states.new_zeros(1).expand_as(hidden_states)  # a view: no memory, output = input
        return zeros, None


def _attention_slot(model: nn.Module, index: int) -> tuple[nn.Module, str]:
    spec = arch.get_spec(model)
    return arch.decoder_layers(model)[index], spec.attn


def bypassed_layers(model: nn.Module) -> list[int]:
    """Indices of the layers whose attention is permanently bypassed (static bypass)."""
    layer_attr = arch.get_spec(model).attn
    return [i for i, layer in enumerate(arch.decoder_layers(model))
            if isinstance(getattr(layer, layer_attr), AttentionBypass) and getattr(layer, layer_attr).inner is None]


def bypass_attention(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Permanently bypass the attention sub-layers of ``layers`` (in place): their weights are dropped.

    The pre-attention norm goes too (its output would be unused). ``config.bypassed_attention`` records
    the layers; ``models.save_pruned`` + ``models.load_pruned`` round-trip the model. Bad indices raise
    ``ValueError`` before anything changes.
    """
    layers = arch.check_layer_set(model, layers, what="attention layers to bypass", allow_all=True)
    params_before = count_parameters(model)
    _swap_in_bypass(model, layers)
    structure.record_edit(model, "bypass_attention", f"attention of layers {layers} bypassed", params_before)
    return model


def _swap_in_bypass(model: nn.Module, layers: list[int]) -> None:
    """Replace the attention (and its pre-norm) of each listed layer by a permanent ``AttentionBypass``."""
    spec = arch.get_spec(model)
    already = set(bypassed_layers(model))
    for index in layers:
        if index in already:
            continue
        layer, attr = _attention_slot(model, index)
        old = getattr(layer, attr)
        setattr(layer, attr, AttentionBypass(getattr(old, "layer_idx", index)))
        setattr(layer, spec.norms[0], nn.Identity())


structure.register(structure.StructureKey(
    "bypassed_attention", "attention sub-layers bypassed (no weights, output = input)",
    lambda model: bypassed_layers(model) or None, _swap_in_bypass))


@torch.no_grad()
def choose_bypass(model: nn.Module, calibration: list[dict], n_layers: int, iterative: bool = True,
                  protect: Iterable[int] = ()) -> list[int]:
    """Pick ``n_layers`` attention sub-layers to bypass; returned in the order chosen, least important first.

    ``iterative=True`` (He et al. 2024): bypass the least important one, re-measure on the bypassed
    model, repeat. The model is unchanged afterwards (the trial bypass is temporary).
    """
    n = arch.num_layers(model)
    protect = set(protect)
    for i in protect:
        arch.check_layer_index(model, i)
    candidates = n - len(protect) - len(bypassed_layers(model))
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 0 <= n_layers <= candidates:
        raise ValueError(f"n_layers must be an int in [0, {candidates}] (layers not protected or already "
                         f"bypassed); got {n_layers!r}")
    require_batches(calibration, "choose_bypass", model)
    excluded = protect | set(bypassed_layers(model))
    chosen: list[int] = []
    scores = attention_importance(model, calibration)
    while len(chosen) < n_layers:
        order = [i for i in scores.argsort().tolist() if i not in excluded and i not in chosen]
        if not iterative:
            return order[:n_layers]
        chosen.append(order[0])
        if len(chosen) < n_layers:
            with skipping(model, chosen):
                scores = attention_importance(model, calibration)
    return chosen


@contextmanager
def skipping(model: nn.Module, layers: Iterable[int]) -> Iterator[nn.Module]:
    """Temporarily skip the attention of ``layers`` (weights kept); everything is restored on exit."""
    layers = sorted(set(layers))
    for index in layers:
        arch.check_layer_index(model, index)
    swapped = []
    try:
        for index in layers:
            layer, attr = _attention_slot(model, index)
            original = getattr(layer, attr)
            if isinstance(original, AttentionBypass):
                continue  # already skipped
            setattr(layer, attr, AttentionBypass(getattr(original, "layer_idx", index), inner=original))
            swapped.append((layer, attr, original))
        yield model
    finally:
        for layer, attr, original in swapped:
            setattr(layer, attr, original)


# ---------------------------------------------------------------------------------------------
# Adaptive bypass: the prompt decides
# ---------------------------------------------------------------------------------------------

@dataclass
class PromptFeatures:
    """What the router looks at before running the model."""

    n_tokens: int  # prompt length in tokens
    embedding_variance: float  # mean over hidden dims of the variance across the prompt's token embeddings


def prompt_features(model: nn.Module, input_ids: torch.Tensor) -> PromptFeatures:
    """Length and embedding variance of one prompt (``input_ids``: (seq,) or (1, seq)); costs one lookup."""
    ids = input_ids.reshape(-1)
    if ids.numel() == 0:
        raise ValueError("empty prompt: nothing to route")
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids.to(model.get_input_embeddings().weight.device)).float()  # (seq, hidden)
    variance = emb.var(dim=0, unbiased=False).mean().item() if ids.numel() > 1 else 0.0
    return PromptFeatures(n_tokens=int(ids.numel()), embedding_variance=variance)


@dataclass
class RouterCalibration:
    """The calibration file's content: how to turn features into a band and a band into skipped layers."""

    model: str  # name_or_path of the model it was calibrated on
    order: list[int]  # attention sub-layers in the order they are skipped (least important first)
    feature_mean: list[float]  # mean of (log n_tokens, log embedding variance) over the calibration prompts
    feature_std: list[float]
    weights: list[float]  # complexity = weights . standardised features
    thresholds: list[float]  # complexity cut points between bands (ascending)
    skip_per_band: list[int]  # attention sub-layers skipped in each band (simplest band first)
    tolerance: float  # allowed calibration loss increase per band (nats/token) that set skip_per_band
    measured: dict = field(default_factory=dict)  # loss increase per band and skip count, for the record
    target: str = "prompt"  # what the loss was measured on: the prompt's own tokens or its continuation
    measured_se: dict = field(default_factory=dict)  # standard error, clustered by group (continuation only)
    halves: list = field(default_factory=list)  # the table on two halves of the prompts (continuation only)
    prompts_per_band: list = field(default_factory=list)
    version: int = CALIBRATION_VERSION

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        return path

    def with_tolerance(self, tolerance: float) -> RouterCalibration:
        """A copy whose skip counts follow ``tolerance`` (``skips_for`` on the measured table; no model run)."""
        return replace(self, tolerance=tolerance, skip_per_band=skips_for(self.measured, tolerance))

    def stable_tolerances(self, candidates: Iterable[float]) -> list[float]:
        """The ``candidates`` at which both halves of the calibration give the full table's plan (``halves``)."""
        if len(self.halves) != 2:
            raise ValueError("this calibration has no halves: calibrate with continuations=... to record them")
        return [t for t in candidates
                if skips_for(self.halves[0], t) == skips_for(self.halves[1], t) == skips_for(self.measured, t)]

    def widest_parted_run(self, candidates: Iterable[float]) -> list[float]:
        """The longest run of consecutive ``candidates`` (ascending) over which the bands part, with the same plan
        throughout, and both halves give that plan (``stable_tolerances``); [] if the bands never part so.
        A plan both halves reproduce over a range of tolerances, not at one lucky point, is one the
        calibration text supports; the run's middle is a tolerance with a margin on both sides."""
        candidates = sorted(candidates)
        stable = set(self.stable_tolerances(candidates))
        best: list[float] = []
        run: list[float] = []
        for t in candidates:
            plan = skips_for(self.measured, t)
            if t in stable and len(set(plan)) > 1 and (not run or plan == skips_for(self.measured, run[-1])):
                run.append(t)
            else:
                run = [t] if t in stable and len(set(plan)) > 1 else []
            if len(run) > len(best):
                best = list(run)
        return best

    @classmethod
    def load(cls, path: str | Path) -> RouterCalibration:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"{path} is calibration version {raw.get('version')}; this code reads "
                             f"{CALIBRATION_VERSION}: re-run AdaptiveBypass.calibrate")
        return cls(**raw)


def skips_for(measured: dict[str, dict[str, float]], tolerance: float) -> list[int]:
    """The calibration rule applied to a measured table (``RouterCalibration.measured``: band -> skip count -> loss
    increase): each band gets the largest skip count whose increase stays within ``tolerance`` (0 if none does),
    then the counts are made non-increasing with complexity. No model run: a new tolerance costs nothing."""
    if not measured:
        raise ValueError("measured is empty: pass RouterCalibration.measured from a calibration")
    skips = [max([0] + [int(k) for k, v in row.items() if v <= tolerance])  # 0: skip nothing
             for _band, row in sorted(measured.items(), key=lambda item: int(item[0]))]
    for b in range(1, len(skips)):  # a more complex band never skips more than a simpler one
        skips[b] = min(skips[b], skips[b - 1])
    return skips


class AdaptiveBypass:
    """Per-prompt attention bypass: simple prompts skip more attention sub-layers, complex ones fewer."""

    def __init__(self, model: nn.Module, calibration: RouterCalibration):
        n = arch.num_layers(model)
        if any(not 0 <= i < n for i in calibration.order):
            raise ValueError(f"calibration names layers outside [0, {n - 1}]: it was made for another model "
                             f"({calibration.model}); re-run AdaptiveBypass.calibrate")
        self.model = model
        self.calibration = calibration

    def complexity(self, features: PromptFeatures) -> float:
        """Weighted sum of the standardised log features (higher = more complex)."""
        c = self.calibration
        raw = (math.log(features.n_tokens), math.log(max(features.embedding_variance, 1e-12)))
        return sum(w * (x - m) / s for w, x, m, s in zip(c.weights, raw, c.feature_mean, c.feature_std, strict=True))

    def band(self, features: PromptFeatures) -> int:
        """0 = simplest band; ``len(thresholds)`` = most complex."""
        score = self.complexity(features)
        return sum(score > t for t in self.calibration.thresholds)

    def plan(self, input_ids: torch.Tensor) -> list[int]:
        """The attention sub-layers to skip for this prompt."""
        k = self.calibration.skip_per_band[self.band(prompt_features(self.model, input_ids))]
        return sorted(self.calibration.order[:k])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """``model.generate`` for one prompt with its planned layers skipped during prefill and decoding."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.shape[0] != 1:
            raise ValueError("AdaptiveBypass.generate routes one prompt at a time; got a batch of "
                             f"{input_ids.shape[0]}")
        with skipping(self.model, self.plan(input_ids)):
            return self.model.generate(input_ids=input_ids, **kwargs)

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model: nn.Module, tokenizer, prompts: list[str], order: list[int],
                  n_bands: int = 3, tolerance: float = 0.15, skip_grid: Iterable[int] = range(0, 13, 2),
                  weights: tuple[float, float] = (0.5, 0.5), model_name: str | None = None,
                  continuations: list[str] | None = None, continuation_tokens: int = 32,
                  groups: list | None = None, batch_size: int = 16) -> AdaptiveBypass:
        """Fit the router on calibration prompts.

        ``model_name`` is recorded in the calibration file (default: the config's ``name_or_path``, which
        offline is a cache path; pass the model id instead, e.g. ``profile.model_id("llama")``).

        Bands split the prompts' complexity at equal quantiles. In each band, the skip count is the largest
        ``k`` in ``skip_grid`` whose loss increase (skipping ``order[:k]``, measured on that band's prompts)
        stays within ``tolerance`` nats/token; the counts are then made non-increasing with complexity.

        What the loss is measured on:
        - ``continuations`` given (one text per prompt, e.g. the rest of its paragraph from ``data.cut_prompts`` or
          ``data.cut_every_length``): the mean loss on the first ``continuation_tokens`` tokens of each continuation
          given its prompt, averaged over the band's prompts with equal weight. Every prompt brings the same
          number of tokens, so short prompts are measured as precisely as long ones, and it is the quantity a
          router is judged on. The calibration also
          records each cell's standard error over the band's prompts (``measured_se``) and the table measured on
          two halves of the prompts (``halves``): if the halves give different plans, calibrate on more prompts.
          Prompts with the same entry in ``groups`` (e.g. cut from the same paragraph) fall in the same half, so
          the halves share no text, and count as one cluster in the standard error; distinct groups alternate
          between the halves in order of first appearance (default: every prompt its own group).
        - otherwise: the loss on the prompts' own tokens (a few tokens for a short prompt: a noisy row).
        """
        if len(prompts) < 2 * n_bands:
            raise ValueError(f"need at least {2 * n_bands} calibration prompts for {n_bands} bands; got {len(prompts)}")
        if not order:
            raise ValueError("order is empty: pass the attention layers to skip, least important first "
                             "(bypass.choose_bypass(model, calibration, n))")
        if continuations is not None and len(continuations) != len(prompts):
            raise ValueError(f"continuations must give one text per prompt: {len(continuations)} for "
                             f"{len(prompts)} prompts (data.cut_prompts returns (prompt, rest) pairs)")
        if groups is not None and len(groups) != len(prompts):
            raise ValueError(f"groups must give one entry per prompt: {len(groups)} for {len(prompts)} prompts")
        if continuation_tokens < 1:
            raise ValueError(f"continuation_tokens must be >= 1; got {continuation_tokens}")
        grid = sorted({int(k) for k in skip_grid if 0 <= k <= len(order)})
        encoded = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in prompts]
        feats = [prompt_features(model, ids) for ids in encoded]
        raw = torch.tensor([[math.log(f.n_tokens), math.log(max(f.embedding_variance, 1e-12))] for f in feats])
        mean, std = raw.mean(0), raw.std(0).clamp_min(1e-6)
        w = torch.tensor(weights, dtype=raw.dtype)
        scores = ((raw - mean) / std) @ w  # (n_prompts,)
        thresholds = [float(torch.quantile(scores, q / n_bands)) for q in range(1, n_bands)]
        bands = [sum(float(s) > t for t in thresholds) for s in scores]
        se, halves, target = {}, [], "prompt"
        if continuations is not None:
            rank: dict = {}
            for g in (groups if groups is not None else range(len(prompts))):
                rank.setdefault(g, len(rank))
            group = [rank[g] for g in (groups if groups is not None else range(len(prompts)))]
            measured, se, halves = _continuation_table(model, tokenizer, encoded, continuations, bands, group,
                                                       n_bands, order, grid, continuation_tokens, batch_size)
            target = "continuation"
        else:
            measured = _prompt_table(model, encoded, bands, n_bands, order, grid)
        calibration = RouterCalibration(
            model=model_name or str(getattr(model.config, "name_or_path", "")), order=list(order),
            feature_mean=mean.tolist(), feature_std=std.tolist(), weights=list(weights), thresholds=thresholds,
            skip_per_band=skips_for(measured, tolerance), tolerance=tolerance, measured=measured, target=target,
            measured_se=se, halves=halves, prompts_per_band=[bands.count(b) for b in range(n_bands)])
        return cls(model, calibration)


def _prompt_table(model: nn.Module, encoded: list[torch.Tensor], bands: list[int], n_bands: int, order: list[int],
                  grid: list[int]) -> dict:
    """Band x skip-count table of the loss increase on the prompts' own tokens (token-weighted per band)."""
    measured = {}
    for b in range(n_bands):
        batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                 for ids, band in zip(encoded, bands, strict=True) if band == b and ids.numel() > 1]
        if not batch:
            raise ValueError(f"band {b} got no prompt longer than one token; give more varied prompts")
        base = evaluation.calibration_loss(model, batch)
        increases = {}
        for k in grid:
            with skipping(model, order[:k]):
                increases[k] = evaluation.calibration_loss(model, batch) - base
        measured[str(b)] = {str(k): round(v, 4) for k, v in increases.items()}
    return measured


def _continuation_table(model: nn.Module, tokenizer, encoded: list[torch.Tensor], continuations: list[str],
                        bands: list[int], group: list[int], n_bands: int, order: list[int], grid: list[int],
                        tokens: int, batch_size: int) -> tuple[dict, dict, list]:
    """Band x skip-count tables of the continuation loss increase: mean, standard error, and on two halves.

    ``group[i]``: the rank of prompt i's group. The halves are the even and odd ranks; the standard error is
    clustered by group (prompts cut from one paragraph share text, so they are not independent draws).
    """
    half = [g % 2 for g in group]
    items = []
    for i, (ids, text) in enumerate(zip(encoded, continuations, strict=True)):
        rest = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].reshape(-1)[:tokens].tolist()
        if not rest:
            raise ValueError(f"continuation {i} is empty: give each prompt the text that follows it")
        items.append((ids.reshape(-1).tolist(), rest))
    n_predicted = torch.tensor([len(rest) for _, rest in items], dtype=torch.float64)
    losses = {}
    for k in sorted(set(grid) | {0}):  # 0: nothing skipped, the base every increase is measured from
        with skipping(model, order[:k]):
            losses[k] = -likelihood.continuation_logprob(model, items, batch_size).double() / n_predicted
    members = [[i for i, band in enumerate(bands) if band == b] for b in range(n_bands)]
    for h in (0, 1):
        sizes = [sum(half[i] == h for i in m) for m in members]
        if min(sizes) < 2:
            raise ValueError(f"half {h} of the prompts has fewer than 2 prompts in a band ({sizes}); give more "
                             "prompts, or more groups")

    def table(pick, with_se=False):
        mean, se = {}, {}
        for b, m in enumerate(members):
            rows = pick(m)
            increase = {k: losses[k][rows] - losses[0][rows] for k in grid}
            mean[str(b)] = {str(k): round(float(v.mean()), 4) for k, v in increase.items()}
            se[str(b)] = {str(k): round(_clustered_se(v, [group[i] for i in rows]), 4) for k, v in increase.items()}
        return (mean, se) if with_se else mean

    measured, se = table(lambda m: m, with_se=True)
    return measured, se, [table(lambda m, h=h: [i for i in m if half[i] == h]) for h in (0, 1)]


def _clustered_se(values: torch.Tensor, clusters: list[int]) -> float:
    """Standard error of the mean of ``values`` when values sharing a cluster may be correlated (cluster-robust,
    with the G / (G - 1) small-sample factor; every value its own cluster gives the usual std / sqrt(n))."""
    residual = values - values.mean()
    sums: dict[int, torch.Tensor] = {}
    for r, c in zip(residual, clusters, strict=True):
        sums[c] = sums.get(c, 0.0) + r
    n_clusters = len(sums)
    if n_clusters < 2:
        return float("nan")
    spread = sum(float(v) ** 2 for v in sums.values()) * n_clusters / (n_clusters - 1)
    return math.sqrt(spread) / len(values)
