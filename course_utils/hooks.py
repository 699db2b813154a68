"""Context managers that capture what flows through a model, padding-aware and always removed.

Three taps, all built on the same ``_Tap`` machinery:
- ``capture_layer_io``: each decoder layer's input and output hidden states (depth pruning);
- ``capture_mlp_activations``: the input of the down/c_proj projection, i.e. the intermediate
  neuron activations (width pruning);
- ``capture_attention_outputs``: what self-attention adds to the residual stream (bypass).

Before each forward pass call ``tap.set_mask(attention_mask)`` (``tap.run(model, batches)`` does
it for you, through ``feed``: no KV cache, and the LM head on the last position only): the hooks keep
only real-token positions, so padding never enters a statistic.
Hooks are removed on exit, even if the body raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from . import arch
from .data import to_device


def select_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, dim) -> (n_real_tokens, dim), dropping positions where ``mask`` is 0."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if mask.shape != x.shape[:2]:
        raise ValueError(f"attention mask shape {tuple(mask.shape)} does not match activations {tuple(x.shape[:2])}; "
                         "call set_mask() with the mask of the batch you run")
    return x[mask.to(x.device).bool()]


def feed(model: nn.Module, batch: dict) -> None:
    """One forward pass whose only purpose is to feed hooks: no KV cache kept, and the LM head applied to the
    last position only (over every position it costs about a fifth of a small model's forward pass, and no
    tap reads the logits). Hooks on the decoder layers and the final norm see every position as usual."""
    kwargs = {"use_cache": False}
    if _takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    model(**to_device(batch, model), **kwargs)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass
class TokenStats:
    """Running per-feature statistics over real tokens (features = last dimension)."""

    count: int = 0
    sum: torch.Tensor | None = None  # (dim,)
    abs_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    max: torch.Tensor | None = None
    min: torch.Tensor | None = None
    track_gram: bool = False  # also accumulate the (dim, dim) Gram matrix sum(a a^T), summed in float64
    gram: torch.Tensor | None = None  # (dim, dim), for least-squares refits

    def update(self, tokens: torch.Tensor) -> None:
        """Add a (n_tokens, dim) block."""
        t = tokens.detach().float()
        if self.track_gram:
            # Each block's product in float32, the running sum in float64: 0.16 s against 0.26 s for a
            # 2,000 x 1,536 block on one core; a block's float32 rounding (about 1e-6 relative) is far below
            # the ridge that every solve adds, and the float64 sum keeps it from growing with the token count.
            block = (t.T @ t).double()  # (dim, dim)
            self.gram = block if self.gram is None else self.gram + block
        if self.sum is None:
            self.sum, self.abs_sum, self.sq_sum = t.sum(0), t.abs().sum(0), (t * t).sum(0)
            self.max, self.min = t.max(0).values, t.min(0).values
        else:
            self.sum += t.sum(0)
            self.abs_sum += t.abs().sum(0)
            self.sq_sum += (t * t).sum(0)
            self.max = torch.maximum(self.max, t.max(0).values)
            self.min = torch.minimum(self.min, t.min(0).values)
        self.count += t.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sq_sum / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """E[a a^T] over real tokens, (dim, dim) float64 (needs ``track_gram=True``)."""
        if self.gram is None:
            raise ValueError("no Gram matrix: capture with gram=True")
        return self.gram / self.count

    @property
    def var(self) -> torch.Tensor:
        """Population variance per feature."""
        return (self.mean_sq - self.mean**2).clamp_min(0)


@dataclass
class Tap:
    """What a capture context yields: per-layer stats, optional raw tokens, and the current mask."""

    layers: list[int]  # decoder-layer indices being tapped
    keep: bool = False  # store every (n_tokens, dim) block in ``raw`` (memory!)
    gram: bool = False  # stats also accumulate the Gram matrix (dim x dim per layer)
    fn: Callable | None = None  # optional callback fn(layer_index, *token_blocks)
    stats: dict[int, TokenStats] = field(default_factory=dict)
    raw: dict[int, list] = field(default_factory=dict)
    mask: torch.Tensor | None = None

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Mask (batch, seq) of the batch about to run; 0 marks padding."""
        self.mask = attention_mask

    @torch.no_grad()
    def run(self, model: nn.Module, batches: Iterable[dict]) -> Tap:
        """Forward every batch (dicts with input_ids and attention_mask) with the right mask set."""
        for batch in batches:
            self.set_mask(batch.get("attention_mask"))
            feed(model, batch)
        self.mask = None
        return self

    def record(self, index: int, *blocks: torch.Tensor) -> None:
        tokens = [select_tokens(b, self.mask) for b in blocks]
        if self.fn is not None:
            self.fn(index, *tokens)
        if len(tokens) == 1:
            self.stats.setdefault(index, TokenStats(track_gram=self.gram)).update(tokens[0])
        if self.keep:
            self.raw.setdefault(index, []).append(tuple(t.detach().cpu() for t in tokens)
                                                   if len(tokens) > 1 else tokens[0].detach().cpu())

    def cat(self, index: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """All kept blocks of one layer concatenated: (n_tokens, dim), or a tuple for paired taps."""
        blocks = self.raw.get(index)
        if not blocks:
            raise ValueError(f"nothing kept for layer {index}: open the context with keep=True and run a batch")
        if isinstance(blocks[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*blocks, strict=True))
        return torch.cat(blocks)


def hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, or tuple whose first item is it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _resolve_layers(model: nn.Module, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(arch.num_layers(model)))
    return [arch.check_layer_index(model, i) for i in layers]


@contextmanager
def removing(handles: list) -> Iterator[None]:
    """Run the body, then remove every hook handle in ``handles``, even if the body raised."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_layer_io(model: nn.Module, layers: Iterable[int] | None = None, keep: bool = False,
                     fn: Callable | None = None) -> Iterator[Tap]:
    """Capture each decoder layer's (input, output) hidden states over real tokens.

    ``fn(index, inputs, outputs)`` gets two (n_tokens, hidden) blocks per layer and batch;
    ``keep=True`` stores them (``tap.cat(i)`` -> (inputs, outputs)).
    """
    tap = Tap(layers=_resolve_layers(model, layers), keep=keep, fn=fn)
    modules = arch.decoder_layers(model)
    handles = []
    for index in tap.layers:
        def hook(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            tap.record(index, hidden_in, hidden_of(output))
        handles.append(modules[index].register_forward_hook(hook, with_kwargs=True))
    with removing(handles):
        yield tap


@contextmanager
def capture_mlp_activations(model: nn.Module, layers: Iterable[int] | None = None, keep: bool = False,
                            fn: Callable | None = None, gram: bool = False) -> Iterator[Tap]:
    """Capture the intermediate activations (input of down_proj / c_proj) of each MLP.

    ``tap.stats[i]`` holds running per-neuron statistics (mean, mean |a|, variance, max, min) and,
    with ``gram=True``, the Gram matrix that least-squares output refits need.
    """
    tap = Tap(layers=_resolve_layers(model, layers), keep=keep, fn=fn, gram=gram)
    handles = []
    for index in tap.layers:
        output_proj = arch.mlp_parts(model, index).output

        def pre_hook(module, args, index=index):
            tap.record(index, args[0])
        handles.append(output_proj.register_forward_pre_hook(pre_hook))
    with removing(handles):
        yield tap


@contextmanager
def capture_attention_outputs(model: nn.Module, layers: Iterable[int] | None = None, keep: bool = False,
                              fn: Callable | None = None) -> Iterator[Tap]:
    """Capture what each self-attention sub-layer adds to the residual stream (after o_proj / c_proj)."""
    tap = Tap(layers=_resolve_layers(model, layers), keep=keep, fn=fn)
    handles = []
    for index in tap.layers:
        attention = arch.attention_module(model, index)

        def hook(module, args, output, index=index):
            tap.record(index, hidden_of(output))
        handles.append(attention.register_forward_hook(hook))
    with removing(handles):
        yield tap


def count_hooks(model: nn.Module) -> int:
    """Number of forward hooks and pre-hooks left on any module (tests use it: should be 0)."""
    # torch keeps hooks in private dicts and offers no public count
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: SLF001


@contextmanager
def skip_layers(model: nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Make decoder layers pass their input through unchanged (a temporary what-if; they still compute).

    Depth-pruning criteria use it to ask "what if this layer were gone?" without copying the model.
    """
    modules = arch.decoder_layers(model)
    handles = []
    for index in sorted({arch.check_layer_index(model, i) for i in layers}):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            if isinstance(output, tuple):
                return (hidden_in, *output[1:])
            return hidden_in
        handles.append(modules[index].register_forward_hook(hook, with_kwargs=True))
    with removing(handles):
        yield
