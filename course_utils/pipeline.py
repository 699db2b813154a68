"""The capstone pipeline as a recipe: depth -> width -> recovery -> quantization -> a saved, verified model.

``Recipe`` says what to do; ``check_request`` refuses a bad recipe, a missing model, an unsupported
architecture, a tokenizer that does not match or an output directory in the way, all **before any weights
are loaded**; ``run`` does the work and writes the output directory atomically (built in a hidden sibling,
renamed into place only when complete, so an interrupted run leaves nothing half-written).

Each step is the course's measured choice:
- depth: the ``depth`` decoder layers of lowest block influence (lesson 04), dropped with the refit of the kept
  layers' MLP output projections (``surgery.drop_layers(..., refit=True)``);
- width: ``width`` of every MLP's neurons, the same width in every layer rounded to ``multiple_of`` so the
  result is a stock config, scored by ``width_method`` with the least-squares refit (lesson 03);
- recovery: ``steps`` AdamW steps of distillation from the unpruned model (``recover="kd"``, lesson 07) or of
  plain fine-tuning (``"finetune"``) on token windows of the calibration text;
- quantization: int8 weight-only through torchao's ``Int8WeightOnlyConfig`` (``quantize="int8"``), applied the
  way ``transformers`` loads it (``TorchAoConfig``), so the saved model reloads with plain
  ``AutoModelForCausalLM.from_pretrained`` (torchao installed).

Depth goes first: the layers are chosen on the unpruned model, and the width statistics are then collected on
the model the width step actually prunes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from . import arch, data, distill, evaluation, importance, models, quantize, surgery
from .profiles import Profile, get_profile

RECOVERY = ("none", "kd", "finetune")
QUANTIZATION = ("none", "int8")
WIDTH_METHODS = ("wanda_like", "activation_norm", "flap", "obs")
REPORT_FILE = "prune_report.json"


@dataclass
class Recipe:
    """What ``run`` does, step by step (every field has a safe default: an all-default recipe changes nothing)."""

    width: float = 0.0  # share of every MLP's neurons removed (0 = no width step)
    width_method: str = "wanda_like"  # neuron score (importance.METHODS) or "obs"
    refit: bool = True  # least-squares refit of what the removed neurons / layers wrote
    multiple_of: int = 64  # kept MLP width rounded to a multiple of this (1 = exact)
    depth: int = 0  # decoder layers removed (0 = no depth step)
    recover: str = "none"  # "none", "kd" (distil from the unpruned model) or "finetune"
    steps: int = 0  # optimiser steps of the recovery
    lr: float = 2e-4
    alpha: float = 0.5  # KD: share of the teacher's term
    temperature: float = 1.0  # KD temperature (1 suits large vocabularies; lesson 07)
    train_seq_len: int = 128
    train_batch_size: int = 4
    quantize: str = "none"  # "none" or "int8" (weight-only, torchao)
    calib_samples: int = 32  # calibration paragraphs for the statistics
    calib_seq_len: int = 256
    eval_tokens: int = 2048  # held-out tokens for the before/after perplexity
    seed: int = 0

    def problems(self) -> list[str]:
        """Everything wrong with the recipe, each as a sentence that says what to do (empty when valid)."""
        out = []

        def number(name, low, high, integer=False, low_open=False, high_open=False):
            value = getattr(self, name)
            kind = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
                out.append(f"{name} must be {'an int' if integer else 'a number'}; got {value!r}")
                return
            below = value <= low if low_open else value < low
            above = value >= high if high_open else value > high
            if below or above:
                out.append(f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}; "
                           f"got {value!r}")

        number("width", 0.0, 0.9)
        number("depth", 0, 10_000, integer=True)
        number("steps", 0, 10_000_000, integer=True)
        number("multiple_of", 1, 4096, integer=True)
        number("lr", 0.0, 1.0, low_open=True)
        number("alpha", 0.0, 1.0)
        number("temperature", 0.0, 100.0, low_open=True)
        for name in ("train_seq_len", "train_batch_size", "calib_samples", "calib_seq_len", "eval_tokens"):
            number(name, 1, 10_000_000, integer=True)
        number("seed", 0, 2**31 - 1, integer=True)
        if self.width_method not in WIDTH_METHODS:
            out.append(f"width_method must be one of {WIDTH_METHODS}; got {self.width_method!r}")
        if self.recover not in RECOVERY:
            out.append(f"recover must be one of {RECOVERY}; got {self.recover!r}")
        elif self.recover != "none" and isinstance(self.steps, int) and self.steps < 1:
            out.append(f"recover={self.recover!r} needs steps >= 1 (e.g. --steps 200); or pass --recover none")
        elif self.recover == "none" and isinstance(self.steps, int) and self.steps > 0:
            out.append(f"steps={self.steps} given but recover='none': pass --recover kd (or finetune) to train")
        if self.quantize not in QUANTIZATION:
            out.append(f"quantize must be one of {QUANTIZATION}; got {self.quantize!r}")
        if not isinstance(self.refit, bool):
            out.append(f"refit must be true or false; got {self.refit!r}")
        return out

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("the recipe is not valid:\n- " + "\n- ".join(problems))

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """A recipe from a ``.json`` or ``.toml`` file with the same field names (unknown names are refused)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"recipe file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                import tomllib  # Python >= 3.11

                raw = tomllib.loads(text)
            else:
                raw = json.loads(text)
        except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
            raise ValueError(f"recipe file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"recipe file {path} must hold a table of fields, e.g. {{\"width\": 0.2}}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"recipe file {path} has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**raw)


@dataclass
class Request:
    """A checked request: where the model is, its config, and where the output goes."""

    model: str
    location: str  # directory or Hub id the weights load from
    config: object
    out: Path
    recipe: Recipe
    calibration_text: Path | None = None
    checkpoint_every: int = 0  # recovery steps between checkpoints (0 = none)
    resume: bool = False  # continue the recovery from the last checkpoint, if there is one

    @property
    def checkpoints(self) -> Path:
        """Where the recovery's checkpoints go: beside the output, kept until the run completes."""
        return self.out.parent / f"{self.out.name}.checkpoints"


def _config_and_tokenizer(location: str):
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(location), AutoTokenizer.from_pretrained(location)


def _checkpoint_owner(model: str, recipe: Recipe) -> dict:
    return {"model": model, "recipe": asdict(recipe)}


def _check_checkpoints(request: Request) -> None:
    """Checkpoints beside ``--out`` must come from this very command, and are used only with ``--resume``."""
    owner_file = request.checkpoints / "recipe.json"
    if not owner_file.is_file():
        return
    if not request.resume:
        raise ValueError(f"{request.checkpoints} holds checkpoints of an earlier run: pass --resume to continue "
                         "it, or remove that folder to start again")
    if json.loads(owner_file.read_text(encoding="utf-8")) != _checkpoint_owner(request.model, request.recipe):
        raise ValueError(f"the checkpoints in {request.checkpoints} come from another model or recipe: run the "
                         "same command to resume it, or remove that folder to start again")


def check_request(model: str, recipe: Recipe, out: str | Path, profile: Profile | str | None = None,
                  calibration_text: str | Path | None = None, overwrite: bool = False,
                  checkpoint_every: int = 0, resume: bool = False) -> Request:
    """Refuse, with a message that says what to do, anything that would fail later; loads no weights.

    Reads only the model's config and tokenizer files: the architecture must be one the course supports,
    the tokenizer must fit the embedding, and the recipe must fit the model (layers left to remove).
    """
    recipe.check()
    if recipe.width == 0 and recipe.depth == 0 and recipe.recover == "none" and recipe.quantize == "none":
        raise ValueError("the recipe does nothing: give --width, --depth, --recover or --quantize")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
    if calibration_text is not None:
        calibration_text = Path(calibration_text)
        if not calibration_text.is_file():
            raise ValueError(f"--calibration-text {calibration_text} does not exist")
    profile = get_profile(profile)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model} is a directory without config.json: give a saved model directory")
        location = str(path)
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"--model {model} does not exist")
    else:
        location = str(models.resolve_source(model, profile)[1])  # a role ('llama'), its offline copy, or a Hub id
    try:
        config, tokenizer = _config_and_tokenizer(location)
    except OSError as error:
        raise ValueError(models.hub_error_message(location, error)) from None
    try:
        arch.get_spec(config)
    except ValueError as error:
        raise ValueError(f"--model {model}: {error}") from None
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer of {model} has {len(tokenizer)} tokens but the model's embedding has "
                         f"{vocab} rows: they do not belong together; save the model with its own tokenizer")
    n_layers = getattr(config, arch.get_spec(config).n_layers_key)
    if recipe.depth > n_layers - 2:
        raise ValueError(f"--depth {recipe.depth}: the model has {n_layers} decoder layers; remove at most "
                         f"{n_layers - 2} so that two remain")
    if recipe.quantize == "int8":
        if arch.get_spec(config) is arch.GPT2:
            raise ValueError("--quantize int8 quantizes nn.Linear layers; GPT-2's MLP and attention are Conv1D, "
                             "so only its output layer would change: use a Llama-family model or --quantize none")
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ValueError("--quantize int8 needs torchao: pip install torchao") from None
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be an int >= 0 (recovery steps); got {checkpoint_every!r}")
    if (checkpoint_every or resume) and recipe.recover == "none":
        raise ValueError("--checkpoint-every and --resume apply to the recovery: give --recover kd (or finetune)")
    shown = profile.model_id(model) if model in profile.models else model
    request = Request(model=shown, location=location, config=config, out=out, recipe=recipe,
                      calibration_text=calibration_text, checkpoint_every=checkpoint_every, resume=resume)
    _check_checkpoints(request)
    return request


@dataclass
class Stage:
    """One row of the report: the model after a step."""

    step: str
    parameters: int
    ppl: float
    seconds: float
    detail: str = ""


@dataclass
class PruneResult:
    out: Path
    stages: list[Stage] = field(default_factory=list)
    layers_removed: list[int] = field(default_factory=list)
    mlp_width: int | None = None
    loader: str = "AutoModelForCausalLM.from_pretrained"

    def table(self) -> str:
        base = self.stages[0]
        lines = [f"{'step':12s} {'params (M)':>10s} {'vs base':>8s} {'PPL':>9s} {'seconds':>8s}  detail"]
        for s in self.stages:
            lines.append(f"{s.step:12s} {s.parameters / 1e6:10.2f} {s.parameters / base.parameters - 1:+8.1%} "
                         f"{s.ppl:9.2f} {s.seconds:8.1f}  {s.detail}")
        return "\n".join(lines)


def _paragraphs(path: Path) -> list[str]:
    """Paragraphs of a text file (blank-line separated), for a practitioner's own calibration text."""
    parts = [" ".join(p.split()) for p in path.read_text(encoding="utf-8").split("\n\n")]
    parts = [p for p in parts if len(p.split()) >= 8]
    if len(parts) < 4:
        raise ValueError(f"--calibration-text {path} gives {len(parts)} paragraphs of 8+ words; give at least 4")
    return parts


# ---------------------------------------------------------------------------------------------
# The steps, each usable on its own (lesson 12 calls them one by one)
# ---------------------------------------------------------------------------------------------

def remove_depth(model: nn.Module, n: int, calibration: list[dict], refit: bool = True) -> list[int]:
    """Drop the ``n`` decoder layers of lowest block influence (in place); refit the kept MLP outputs. Returns them."""
    influence = importance.block_influence(model, calibration)
    layers = sorted(influence.argsort()[:n].tolist())
    surgery.drop_layers(model, layers, calibration=calibration if refit else None, refit=refit)
    return layers


def remove_width(model: nn.Module, ratio: float, calibration: list[dict], method: str = "wanda_like",
                 refit: bool = True, multiple_of: int = 64):
    """Remove ``ratio`` of every MLP's neurons, the same kept width in every layer (a stock config); in place."""
    needs_gram = refit or method == "obs"
    stats = importance.collect_stats(model, calibration, gram=needs_gram)
    return surgery.prune_mlp(model, ratio, method=method, stats=stats, multiple_of=multiple_of,
                             refit=None if method == "obs" else refit)


def recover(student: nn.Module, teacher: nn.Module | None, windows: list[dict], recipe: Recipe,
            progress: bool = True, teacher_cache: distill.TeacherCache | None = None,
            **checkpointing) -> distill.History:
    """``recipe.steps`` of distillation from ``teacher`` (or plain fine-tuning when ``teacher`` is None);
    ``checkpointing``: ``checkpoint_dir``, ``checkpoint_every``, ``resume``, ``accelerator`` of ``distill.distill``."""
    config = distill.DistillConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=max(1, recipe.steps // 10),
                                   alpha=recipe.alpha if teacher is not None else 0.0,
                                   temperature=recipe.temperature, eval_every=0, seed=recipe.seed)
    history = distill.distill(student, teacher, windows, config, progress=progress,
                              name="kd" if teacher is not None else "finetune", teacher_cache=teacher_cache,
                              **checkpointing)
    student.eval()
    return history


def quantize_int8(model: nn.Module, tokenizer, work: str | Path) -> nn.Module:
    """An int8 weight-only copy of ``model`` (every ``nn.Linear`` but the output layer), made the way
    ``from_pretrained`` applies torchao, so it saves and reloads with the stock loader; ``work`` is scratch space."""
    return quantize.int8_copy(model, tokenizer, Path(work))


def run(request: Request, profile: Profile | str | None = None, progress: bool = True,
        log=print) -> PruneResult:
    """Run a checked request (``check_request``); the output directory appears only when everything succeeded.

    Under ``accelerate launch`` every process prunes the same way and trains on its share of the batches (DDP);
    only the main process quantizes and saves (the others return after the recovery).
    """
    from tqdm.auto import tqdm

    accelerator = distill.make_accelerator()
    main_process = accelerator.is_main_process
    progress, log = progress and main_process, log if main_process else (lambda *_: None)
    recipe, profile = request.recipe, get_profile(profile)
    torch.manual_seed(recipe.seed)
    n_steps = 2 + bool(recipe.depth) + bool(recipe.width) + (recipe.recover != "none") + (recipe.quantize != "none")
    bar = tqdm(total=n_steps, desc="prune", disable=not progress, unit="step")
    result = PruneResult(out=request.out)
    start = time.perf_counter()

    model, tokenizer = models.load_model(request.location, profile)
    if request.calibration_text:
        texts = _paragraphs(request.calibration_text)
    else:
        texts = data.load_texts("calibration", profile)
    held_out = data.load_texts("evaluation", profile)

    def ppl(m):
        return evaluation.perplexity(m, tokenizer, held_out, max_tokens=recipe.eval_tokens)

    def stage(step, m, detail=""):
        nonlocal start
        result.stages.append(Stage(step, models.count_parameters(m), ppl(m), time.perf_counter() - start, detail))
        log(f"{step}: {result.stages[-1].parameters / 1e6:.2f} M parameters, held-out PPL "
            f"{result.stages[-1].ppl:.2f}" + (f" ({detail})" if detail else ""))
        bar.update(1)
        start = time.perf_counter()

    calibration = data.calibration_batches(tokenizer, texts, n_samples=recipe.calib_samples,
                                           seq_len=recipe.calib_seq_len, seed=recipe.seed)
    teacher = model
    student = copy.deepcopy(model) if recipe.recover == "kd" or recipe.depth or recipe.width else model
    stage("base", teacher, request.model)
    if recipe.depth:
        layers = remove_depth(student, recipe.depth, calibration, refit=recipe.refit)
        result.layers_removed = layers
        stage("depth", student, f"layers {layers} removed (lowest block influence)"
              + (", kept layers refitted" if recipe.refit else ""))
    if recipe.width:
        report = remove_width(student, recipe.width, calibration, method=recipe.width_method, refit=recipe.refit,
                              multiple_of=recipe.multiple_of)
        result.mlp_width = int(arch.intermediate_size(student))
        stage("width", student, f"{recipe.width:.0%} of MLP neurons by {recipe.width_method}"
              + (" + refit" if recipe.refit or recipe.width_method == "obs" else "")
              + f", width {result.mlp_width} in every layer ({report.params_before / 1e6:.1f} M -> "
                f"{report.params_after / 1e6:.1f} M)")
    if recipe.recover != "none":
        windows = data.token_windows(tokenizer, texts, seq_len=recipe.train_seq_len,
                                     batch_size=recipe.train_batch_size, seed=recipe.seed)
        checkpointing = {}
        if request.checkpoint_every or request.resume:
            if main_process:
                request.checkpoints.mkdir(parents=True, exist_ok=True)
                (request.checkpoints / "recipe.json").write_text(
                    json.dumps(_checkpoint_owner(request.model, recipe)), encoding="utf-8")
            checkpointing = dict(checkpoint_dir=request.checkpoints, checkpoint_every=request.checkpoint_every,
                                 resume=request.resume)
        checkpointing["accelerator"] = accelerator
        recover(student, teacher if recipe.recover == "kd" else None, windows, recipe, progress=progress,
                **checkpointing)
        stage(recipe.recover, student, f"{recipe.steps} steps x {recipe.train_batch_size * recipe.train_seq_len} "
              "tokens" + (f", alpha {recipe.alpha}, T {recipe.temperature}" if recipe.recover == "kd" else ""))
    if teacher is not student:
        del teacher
    if not main_process:
        bar.close()
        return result

    out = request.out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # removed whatever happens
    try:
        final = student
        if recipe.quantize == "int8":
            final = quantize.int8_copy(student, tokenizer, work / "float")
            stage("int8", final, "weight-only int8 (torchao), through TorchAoConfig")
        card = {"source model": request.model, "recipe": json.dumps(asdict(recipe), sort_keys=True),
                **{f"PPL after {s.step}": round(s.ppl, 2) for s in result.stages},
                "held-out text": f"{recipe.eval_tokens} tokens of the {profile.name} profile's evaluation split"}
        target = work / "model"
        if recipe.quantize == "int8":
            quantize.save_int8(final, tokenizer, target, card)
        else:
            models.save_pruned(final, tokenizer, target, card=card)  # verified: reloads to identical logits
        result.stages.append(Stage("save", result.stages[-1].parameters, result.stages[-1].ppl,
                                   time.perf_counter() - start, str(out)))
        (target / REPORT_FILE).write_text(json.dumps(
            {"model": request.model, "recipe": asdict(recipe), "layers_removed": result.layers_removed,
             "mlp_width": result.mlp_width, "stages": [asdict(s) for s in result.stages],
             "profile": profile.name, "loader": result.loader}, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.rename(target, out)
        shutil.rmtree(request.checkpoints, ignore_errors=True)  # the run is complete: nothing to resume
        bar.update(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bar.close()
    return result
