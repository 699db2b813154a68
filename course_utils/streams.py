"""Running calibration tokens through a decoder one layer at a time.

The closed-form repairs of ``refit`` and the damage probes of ``sensitivity`` need the hidden states
that enter a given layer, for the original model and for a model pruned so far (two *streams*, as in
SparseGPT, Frantar & Alistarh 2023). ``layer_inputs`` stops a forward pass at the first decoder layer
and keeps what that layer receives; each layer can then run alone: ``layer(hidden, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import arch, hooks
from .data import require_batches, to_device
from .evaluation import next_token_loss


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


@torch.no_grad()
def layer_inputs(model: nn.Module, calibration: list[dict]) -> list[tuple[torch.Tensor, dict]]:
    """Per batch: the hidden states entering the first decoder layer and the keyword arguments it receives.

    The forward pass stops there. Every decoder layer of the supported families takes the same keyword
    arguments (attention mask, position embeddings), so a layer can then be run alone:
    ``layer(hidden, **kwargs)``. (For models mixing sliding-window and full-attention layers the masks differ
    only beyond the window, far longer than calibration samples.)
    """
    require_batches(calibration, "layer_inputs", model)
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().clone(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = arch.decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    with hooks.removing([handle]):
        for batch in calibration:
            try:
                model(**to_device(batch, model), use_cache=False)
            except _StopForward:
                pass
    return captured


@contextmanager
def recording_outputs(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """While open, each forward pass appends every decoder layer's output, (batch, seq, hidden), to ``outputs[layer]``.

    Open it around the statistics pass (``importance.collect_stats``) and the unpruned model's outputs come for
    free: ``refit.sequential_obs(..., reference=outputs)`` then skips the unpruned stream, one of its two passes.
    Memory: layers x calibration tokens x hidden floats (SmolLM2, 128 x 256 tokens: 2.3 GB in float32).
    """
    outputs: list[list[torch.Tensor]] = [[] for _ in arch.decoder_layers(model)]
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(hooks.hidden_of(out).detach()))
               for i, layer in enumerate(arch.decoder_layers(model))]
    with hooks.removing(handles):
        yield outputs


def check_reference(reference: list[list[torch.Tensor]], stream: list[torch.Tensor], n_layers: int) -> None:
    """Refuse recorded outputs that do not belong to this model and calibration (before anything changes)."""
    if len(reference) != n_layers or any(len(r) != len(stream) for r in reference):
        raise ValueError(f"reference must hold {n_layers} layers x {len(stream)} batches of outputs "
                         "(record them with streams.recording_outputs(model) around one pass over these calibration "
                         "batches); got " + f"{len(reference)} layers x {[len(r) for r in reference][:3]}... batches")
    for r in reference:
        for out, hidden in zip(r, stream, strict=True):
            if out.shape != hidden.shape:
                raise ValueError(f"a recorded output has shape {tuple(out.shape)}, the calibration batch gives "
                                 f"{tuple(hidden.shape)}: record the outputs on the same calibration batches")


def run_layer(layer: nn.Module, stream: list[torch.Tensor], arguments: list[dict]) -> list[torch.Tensor]:
    """One decoder layer applied to every batch of a stream."""
    return [hooks.hidden_of(layer(h, **kw)) for h, kw in zip(stream, arguments, strict=True)]


def two_streams(model: nn.Module, calibration: list[dict]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict], list[torch.Tensor | None]]:
    """The start of a two-stream pass: (reference stream, a copy to prune, per-batch layer kwargs, masks)."""
    captured = layer_inputs(model, calibration)
    masks = [batch["attention_mask"].bool() if "attention_mask" in batch else None for batch in calibration]
    return ([hidden for hidden, _ in captured], [hidden.clone() for hidden, _ in captured],
            [kwargs for _, kwargs in captured], masks)


def run_tapped(model: nn.Module, index: int, stream: list[torch.Tensor], arguments: list[dict]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Run decoder layer ``index`` on ``stream``: (outputs, output-projection inputs, residual before the MLP)."""
    spec = arch.get_spec(model)
    layer = arch.decoder_layers(model)[index]
    activations, mlp_outputs = [], []
    taps = [arch.mlp_parts(model, index).output.register_forward_pre_hook(lambda m, args: activations.append(args[0])),
            getattr(layer, spec.mlp).register_forward_hook(lambda m, a, out: mlp_outputs.append(hooks.hidden_of(out)))]
    with hooks.removing(taps):
        outs = run_layer(layer, stream, arguments)
    return outs, activations, [out - m for out, m in zip(outs, mlp_outputs, strict=True)]


def output_moments(activations: list[torch.Tensor], mids: list[torch.Tensor], targets: list[torch.Tensor],
                   masks: list[torch.Tensor | None], block_dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x x^T] and E[x t^T] over real tokens, x = (a, 1), t = target - mid: what an MLP output projection must write.

    Per batch: ``activations`` (the output projection's inputs a), ``mids`` (the residual stream just before the
    MLP adds its output), ``targets`` (the layer output wanted). Returned in float64 on the CPU, summed in float64;
    each batch's products are taken in ``block_dtype``. ``torch.float32`` is faster on a CPU (0.16 s against
    0.26 s for a 2,000 x 1,536 block on one core, as measured for ``hooks.TokenStats``) and safe where every
    solve adds a damping far above its rounding (``sequential_obs``: weights within 2e-5 of float64 on SmolLM2,
    the same neurons kept); the depth refits, lightly damped, move by up to 8e-4 with it and keep float64.
    """
    width, hidden = activations[0].shape[-1], mids[0].shape[-1]
    gram = torch.zeros(width + 1, width + 1, dtype=torch.float64)
    cross = torch.zeros(width + 1, hidden, dtype=torch.float64)
    count = 0
    for act, mid, target, mask in zip(activations, mids, targets, masks, strict=True):
        x = hooks.select_tokens(act, mask).to(block_dtype)
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        t = hooks.select_tokens(target - mid, mask).to(block_dtype)
        gram += (x.T @ x).double().cpu()
        cross += (x.T @ t).double().cpu()
        count += x.shape[0]
    return gram / count, cross / count


@torch.no_grad()
def loss_from(model: nn.Module, index: int, stream: list[torch.Tensor], arguments: list[dict],
              calibration: list[dict], skip: Iterable[int] = ()) -> float:
    """``evaluation.calibration_loss`` computed from the hidden states entering decoder layer ``index``.

    Layers in ``skip`` pass their input through (as if removed), like ``hooks.skip_layers``.
    """
    norm = arch.get_module(model, arch.get_spec(model).final_norm)
    head = model.get_output_embeddings()
    skip = set(skip)
    later = [layer for i, layer in enumerate(arch.decoder_layers(model)) if i >= index and i not in skip]
    total, count = 0.0, 0
    for hidden, kwargs, batch in zip(stream, arguments, calibration, strict=True):
        for layer in later:
            hidden = hooks.hidden_of(layer(hidden, **kwargs))
        loss, tokens = next_token_loss(head(norm(hidden)), batch)
        total, count = total + loss, count + tokens
    return total / count
