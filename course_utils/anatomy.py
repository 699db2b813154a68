"""Where a model's parameters live: totals (tied weights counted once) and a per-part breakdown.

``describe(model)`` splits the parameters into embeddings, attention, MLP, norms and an untied
``lm_head``, per decoder layer too, using the architecture table in ``arch`` to find the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from . import arch, projections


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def neuron_parameters(model: nn.Module, index: int) -> int:
    """Parameters one MLP neuron of layer ``index`` owns: its row (and bias) in each input projection and its
    column in the output projection. Llama: 3 x hidden (gate row, up row, down column); GPT-2: 2 x hidden + 1."""
    parts = arch.mlp_parts(model, index)
    own = sum(projections.in_features(m) + (getattr(m, "bias", None) is not None) for m in parts.inputs)
    return own + projections.out_features(parts.output)


@dataclass
class Anatomy:
    """Where a model's parameters live."""

    name: str  # model class and size
    groups: dict[str, int]  # "embeddings", "attention", "mlp", "norms", "lm_head", "other" -> params
    per_layer: list[dict[str, int]] = field(default_factory=list)  # per decoder layer: attention, mlp, norms
    total: int = 0

    def share(self, group: str) -> float:
        """Fraction of all parameters in ``group``."""
        return self.groups.get(group, 0) / self.total

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.total / 1e6:.1f} M parameters"]
        for group, n in self.groups.items():
            if n:
                lines.append(f"  {group:<11} {n / 1e6:8.2f} M  {100 * n / self.total:5.1f} %")
        if self.per_layer:
            first = self.per_layer[0]
            lines.append(f"  per decoder layer (x{len(self.per_layer)}): attention {first['attention'] / 1e6:.2f} M, "
                         f"MLP {first['mlp'] / 1e6:.2f} M, norms {first['norms'] / 1e3:.1f} K")
            if any(layer != first for layer in self.per_layer):
                lines.append("  (layer sizes differ: " + ", ".join(
                    f"{i}: mlp {layer['mlp'] / 1e6:.2f} M" for i, layer in enumerate(self.per_layer)) + ")")
        return "\n".join(lines)

    _repr_pretty_ = lambda self, p, cycle: p.text(str(self))  # noqa: E731  (IPython display)


def describe(model: nn.Module) -> Anatomy:
    """Count parameters in embeddings / attention / MLP / norms / untied lm_head, and per decoder layer."""
    spec = arch.get_spec(model)
    n_layers = arch.num_layers(model)
    groups = dict(embeddings=0, attention=0, mlp=0, norms=0, lm_head=0, other=0)
    per_layer = [dict(attention=0, mlp=0, norms=0) for _ in range(n_layers)]
    layer_prefix = spec.layers + "."
    for name, param in model.named_parameters():
        n = param.numel()
        if name.startswith(layer_prefix):
            index_str, rest = name[len(layer_prefix):].split(".", 1)
            part = rest.split(".", 1)[0]
            kind = {spec.attn: "attention", spec.mlp: "mlp"}.get(part, "norms" if part in spec.norms else None)
            if kind is None:
                groups["other"] += n
                continue
            groups[kind] += n
            per_layer[int(index_str)][kind] += n
        elif any(name.startswith(e + ".") for e in spec.embeddings):
            groups["embeddings"] += n
        elif name.startswith(spec.final_norm + "."):
            groups["norms"] += n
        elif name.startswith("lm_head."):
            groups["lm_head"] += n
        else:
            groups["other"] += n
    total = sum(groups.values())
    label = f"{type(model).__name__} ({n_layers} layers)"
    return Anatomy(name=label, groups=groups, per_layer=per_layer, total=total)
