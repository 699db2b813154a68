"""Checker helpers for exercises and notebook assertions: instant, readable feedback.

Each check returns quietly when it passes and raises ``AssertionError`` with a message that says what
was expected, what was found and what to look at (in the spirit of d2l's ``check_shape`` and the
``cmp`` helper of Karpathy's makemore).
"""

from __future__ import annotations

import torch
from torch import nn

from .anatomy import count_parameters


def check_shape(tensor: torch.Tensor, shape: tuple[int, ...], name: str = "tensor") -> None:
    """``tensor`` has exactly ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise AssertionError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def check_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, name: str = "result") -> None:
    """Same shape and values within ``atol``; the message gives the largest difference."""
    check_shape(actual, tuple(expected.shape), name)
    diff = (actual.detach().float() - expected.detach().float()).abs().max().item() if actual.numel() else 0.0
    if diff > atol:
        raise AssertionError(f"{name} differs from the expected values by up to {diff:.3g} (allowed {atol:g})")


def check_params_reduced(model: nn.Module, params_before: int, at_least: float = 0.0) -> float:
    """The model has fewer parameters than ``params_before``, by at least ``at_least`` (a fraction); returns it."""
    after = count_parameters(model)
    reduction = 1 - after / params_before
    if after >= params_before or reduction < at_least:
        raise AssertionError(f"parameters went from {params_before:,} to {after:,} ({reduction:+.1%}); "
                             f"expected a reduction of at least {at_least:.0%}. Did the surgery replace the modules?")
    return reduction
