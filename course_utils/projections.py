"""Linear and Conv1D projections behind one (out, in) view: read, slice, write, add a bias.

``nn.Linear`` stores its weight as (out_features, in_features); GPT-2's ``transformers`` ``Conv1D``
stores the transpose, (in_features, out_features). Every module of the package that reads or edits a
projection goes through this file, so the orientation is handled in exactly one place.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED = (nn.Linear, Conv1D)


def check_projection(module: nn.Module, where: str = "") -> nn.Module:
    """Return ``module`` if it is an ``nn.Linear`` or a transformers ``Conv1D``, else raise a ``ValueError``."""
    if not isinstance(module, SUPPORTED):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}cannot edit a {type(module).__name__}; only nn.Linear and transformers "
                         "Conv1D projections are supported (a quantized or fused module must be dequantized first)")
    return module


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), detached; a view of the stored tensor (Conv1D stores (in, out))."""
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Linear) else weight.T


def out_features(module: nn.Module) -> int:
    """How many outputs the projection produces."""
    return module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]


def in_features(module: nn.Module) -> int:
    """How many inputs the projection reads."""
    return module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]


def sliced(module: nn.Module, keep: torch.Tensor, dim: str) -> nn.Module:
    """A new projection holding only the ``keep`` outputs (``dim="out"``) or inputs (``dim="in"``).

    The bias follows the outputs: it is sliced with ``dim="out"`` and kept whole with ``dim="in"``.
    """
    if dim not in ("out", "in"):
        raise ValueError(f"dim must be 'out' or 'in'; got {dim!r}")
    check_projection(module)
    weight = weight_out_in(module)
    keep = keep.to(weight.device)
    weight = weight[keep] if dim == "out" else weight[:, keep]  # (out', in')
    n_out, n_in = weight.shape
    with torch.device("meta"):  # no memory for weights that are replaced at once
        new = nn.Linear(n_in, n_out, bias=module.bias is not None) if isinstance(module, nn.Linear) \
            else Conv1D(n_out, n_in)  # Conv1D(nf=out, nx=in)
    stored = weight if isinstance(module, nn.Linear) else weight.T
    # contiguous: a transposed view would take another matmul kernel than the saved (contiguous) copy,
    # and the reloaded model would differ in the last bits
    new.weight = nn.Parameter(stored.clone(memory_format=torch.contiguous_format),
                              requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        bias = module.bias.detach()
        new.bias = nn.Parameter((bias[keep] if dim == "out" else bias).clone(memory_format=torch.contiguous_format),
                                requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


@torch.no_grad()
def write(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Copy a weight given as (out, in), and optionally a (out,) bias, into ``module`` (any layout)."""
    expected = (out_features(module), in_features(module))
    if tuple(weight.shape) != expected:
        raise ValueError(f"weight must be (out, in) = {expected} for this projection; got {tuple(weight.shape)}")
    module.weight.copy_((weight if isinstance(module, nn.Linear) else weight.T).to(module.weight.dtype))
    if bias is not None:
        if module.bias is None:
            raise ValueError("this projection has no bias to write: call ensure_bias(module) first")
        module.bias.copy_(bias.to(module.bias.dtype))


def ensure_bias(module: nn.Module) -> bool:
    """Give the projection a zero bias if it has none; True when one was added."""
    if module.bias is not None:
        return False
    module.bias = nn.Parameter(torch.zeros(out_features(module), dtype=module.weight.dtype,
                                           device=module.weight.device), requires_grad=module.weight.requires_grad)
    return True


@torch.no_grad()
def fold_output_map(module: nn.Module, transform: torch.Tensor) -> None:
    """Make the projection compute ``y @ transform`` instead of ``y`` (``transform``: (out, out)).

    In the (out, in) view y = W x + b, so the new weight is transform^T W and the new bias b transform.
    """
    weight = weight_out_in(module)
    t = transform.to(weight.device, weight.dtype)
    bias = module.bias.detach() @ t if module.bias is not None else None
    write(module, t.T @ weight, bias)
