"""The one table of architecture knowledge.

Every module that touches a model's parts asks this file where they are: the decoder layers,
the MLP (GPT-2's ``Conv1D`` pair or the Llama family's GLU triple), the attention projections
and head counts, and the config keys that change when a part shrinks. Adding a model family is
one new ``ArchSpec`` entry in ``SPECS``.

Families differ in what their *stock* config can express: Llama's ``mlp_bias`` flag gives every MLP
projection a bias, while Qwen2, Qwen3 and Mistral build their MLPs without biases whatever the config
says. ``ArchSpec.mlp_bias_key`` records that difference, so ``structure`` knows when a refitted MLP
(which carries a bias) still reloads with plain ``from_pretrained`` and when it needs ``load_pruned``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from . import projections


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its parts (attribute paths are dotted, relative to the model)."""

    family: str  # human name, shown in errors and reports
    model_types: tuple[str, ...]  # config.model_type values that belong to this family
    layers: str  # path to the ModuleList of decoder layers
    embeddings: tuple[str, ...]  # token (and position) embedding modules
    final_norm: str  # norm after the last decoder layer
    mlp: str  # attribute of a decoder layer holding the MLP
    mlp_kind: str  # "conv1d_pair" (GPT-2: c_fc -> act -> c_proj) or "glu" (act(gate) * up -> down)
    mlp_inputs: tuple[str, ...]  # projections whose *outputs* are the intermediate neurons
    mlp_output: str  # projection whose *input* is the intermediate activation
    attn: str  # attribute of a decoder layer holding self-attention
    attn_fused_qkv: str | None  # GPT-2 keeps q, k, v in one Conv1D (c_attn)
    attn_q: str | None
    attn_k: str | None
    attn_v: str | None
    attn_o: str  # output projection of attention
    norms: tuple[str, ...]  # the decoder layer's own norms (attribute names)
    n_layers_key: str  # config key holding the number of decoder layers
    intermediate_key: str  # config key holding the MLP width
    n_heads_key: str  # config key: number of query heads
    n_kv_heads_key: str | None  # config key: number of key/value heads (None: same as query heads)
    hidden_key: str  # config key: model width
    per_layer_keys: tuple[str, ...] = ()  # config lists with one entry per layer (e.g. layer_types)
    mlp_bias_key: str | None = None  # stock config flag that gives the MLP projections biases (None: no such flag)
    mlp_always_biased: bool = False  # the MLP projections always carry biases (GPT-2)


GPT2 = ArchSpec(
    family="GPT-2",
    model_types=("gpt2",),
    layers="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    mlp="mlp",
    mlp_kind="conv1d_pair",
    mlp_inputs=("c_fc",),
    mlp_output="c_proj",
    attn="attn",
    attn_fused_qkv="c_attn",
    attn_q=None,
    attn_k=None,
    attn_v=None,
    attn_o="c_proj",
    norms=("ln_1", "ln_2"),
    n_layers_key="n_layer",
    intermediate_key="n_inner",
    n_heads_key="n_head",
    n_kv_heads_key=None,
    hidden_key="n_embd",
    mlp_always_biased=True,
)

LLAMA = ArchSpec(
    family="Llama (Llama, SmolLM2)",
    model_types=("llama",),
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    mlp="mlp",
    mlp_kind="glu",
    mlp_inputs=("gate_proj", "up_proj"),
    mlp_output="down_proj",
    attn="self_attn",
    attn_fused_qkv=None,
    attn_q="q_proj",
    attn_k="k_proj",
    attn_v="v_proj",
    attn_o="o_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    n_layers_key="num_hidden_layers",
    intermediate_key="intermediate_size",
    n_heads_key="num_attention_heads",
    n_kv_heads_key="num_key_value_heads",
    hidden_key="hidden_size",
    per_layer_keys=("layer_types",),
    mlp_bias_key="mlp_bias",
)

# Same module layout and config keys as Llama, but the stock MLP has no bias flag.
LLAMA_LIKE = dataclasses.replace(LLAMA, family="Llama-like (Qwen2, Qwen3, Mistral)",
                                 model_types=("qwen2", "qwen3", "mistral"), mlp_bias_key=None)

SPECS: tuple[ArchSpec, ...] = (GPT2, LLAMA, LLAMA_LIKE)


def supported_families() -> str:
    """One line naming every supported family and its model_type values."""
    return "; ".join(f"{s.family} [model_type: {', '.join(s.model_types)}]" for s in SPECS)


def get_spec(model_or_config) -> ArchSpec:
    """Return the ArchSpec for a model (or its config); unknown families raise ``ValueError``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    raise ValueError(
        f"unsupported architecture {model_type!r}. Supported: {supported_families()}. "
        "To add a family, add an ArchSpec entry to course_utils/arch.py."
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path (``"model.layers"``) from ``root``."""
    module = root
    for name in path.split("."):
        module = getattr(module, name)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers."""
    return get_module(model, get_spec(model).layers)


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers currently in the model."""
    return len(decoder_layers(model))


def check_layer_index(model: nn.Module, index: int) -> int:
    """Return ``index`` if it names a decoder layer, else raise a ``ValueError`` that says the range."""
    n = num_layers(model)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        raise ValueError(f"layer index must be an int in [0, {n - 1}] for this {n}-layer model; got {index!r}")
    return index


def check_layer_set(model: nn.Module, indices: Iterable[int], what: str = "layers to remove",
                    allow_all: bool = False) -> list[int]:
    """Validate a set of layer indices (ints in range, no duplicates, not every layer); return them sorted."""
    indices = list(indices)
    for i in indices:
        check_layer_index(model, i)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{what} contain duplicates: {sorted(indices)}; name each layer once")
    n = num_layers(model)
    if not allow_all and len(indices) >= n:
        raise ValueError(f"cannot remove all {n} layers ({what}: {sorted(indices)}); keep at least one")
    return sorted(indices)


@dataclass
class MLPParts:
    """The linear layers of one MLP and its current width (number of intermediate neurons)."""

    kind: str  # "conv1d_pair" or "glu"
    inputs: list[nn.Module]  # c_fc, or gate_proj and up_proj
    output: nn.Module  # c_proj or down_proj
    width: int  # intermediate neurons


def mlp_parts(model: nn.Module, index: int) -> MLPParts:
    """The MLP projections of decoder layer ``index``."""
    spec = get_spec(model)
    check_layer_index(model, index)
    mlp = getattr(decoder_layers(model)[index], spec.mlp)
    inputs = [getattr(mlp, name) for name in spec.mlp_inputs]
    return MLPParts(kind=spec.mlp_kind, inputs=inputs, output=getattr(mlp, spec.mlp_output),
                    width=projections.out_features(inputs[0]))


@dataclass
class AttentionParts:
    """The projections and head layout of one self-attention module."""

    module: nn.Module  # the attention module itself
    q: nn.Module | None  # None when q, k, v are fused (GPT-2)
    k: nn.Module | None
    v: nn.Module | None
    qkv: nn.Module | None  # GPT-2's fused c_attn
    o: nn.Module
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (fewer than n_heads under grouped-query attention)
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def groups(self) -> list[list[int]]:
        """Query-head indices of each key/value head: GQA's layout, query head h reads K/V head h // group_size."""
        size = self.group_size
        return [list(range(g * size, (g + 1) * size)) for g in range(self.n_kv_heads)]


def attention_module(model: nn.Module, index: int) -> nn.Module:
    """The self-attention module of decoder layer ``index`` (possibly a ``bypass.AttentionBypass``)."""
    check_layer_index(model, index)
    return getattr(decoder_layers(model)[index], get_spec(model).attn)


def attention_parts(model: nn.Module, index: int) -> AttentionParts:
    """The attention projections of decoder layer ``index`` and its head counts."""
    spec = get_spec(model)
    check_layer_index(model, index)
    config = model.config
    attn = getattr(decoder_layers(model)[index], spec.attn)
    n_heads = getattr(config, spec.n_heads_key)
    n_kv = getattr(config, spec.n_kv_heads_key) if spec.n_kv_heads_key else n_heads
    n_kv = n_kv or n_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, spec.hidden_key) // n_heads

    def part(name: str | None) -> nn.Module | None:
        return getattr(attn, name, None) if name else None

    if part(spec.attn_q) is not None and part(spec.attn_k) is not None:  # count what the layer has (head pruning
        n_heads = projections.out_features(part(spec.attn_q)) // head_dim  # may leave layers unequal)
        n_kv = projections.out_features(part(spec.attn_k)) // head_dim

    return AttentionParts(
        module=attn,
        q=part(spec.attn_q),
        k=part(spec.attn_k),
        v=part(spec.attn_v),
        qkv=part(spec.attn_fused_qkv),
        o=getattr(attn, spec.attn_o),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
    )


def intermediate_size(model: nn.Module) -> int:
    """The MLP width declared in the config (GPT-2's ``n_inner=None`` means 4 x hidden)."""
    spec = get_spec(model)
    value = getattr(model.config, spec.intermediate_key, None)
    return value if value is not None else 4 * getattr(model.config, spec.hidden_key)


def cache_kwargs(model: nn.Module, cache) -> dict:
    """Keyword arguments that hand ``cache`` (a transformers ``Cache``) to ``model(...)`` for reuse.

    transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``; this picks
    whichever name ``model.forward`` declares, so the same call works on either side of the rename.
    """
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}
