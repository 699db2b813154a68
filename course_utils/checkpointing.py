"""Training state that survives an interruption: accelerate's ``save_state`` with atomic, self-checking folders.

A checkpoint is ``step-NNNNNN/`` (written as a hidden ``.step-NNNNNN.partial`` and renamed when complete, so a
crash never leaves one that looks whole) holding what ``save_state`` writes (the model being trained, the
optimiser, registered objects such as the LR schedule, the random states of every process) and
``history.json``: the losses so far and a fingerprint of the settings, which a resumed run must match.
Only the newest checkpoint is kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from torch import nn

PREFIX = "step-"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (a half-written one is never listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "history.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def fingerprint(config, n_batches: int, n_processes: int) -> dict:
    """What a checkpoint must agree on to be resumed (JSON-shaped: dict keys become strings)."""
    settings = asdict(config)
    settings.pop("eval_every")
    return json.loads(json.dumps({"config": settings, "batches": n_batches, "processes": n_processes}))


def save(accelerator, directory: Path, step: int, history: dict, fingerprint: dict) -> None:
    """save_state into a hidden folder, then rename it into place and drop the older checkpoints."""
    partial = directory / f".{PREFIX}{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "fingerprint": fingerprint, **history}
        (partial / "history.json").write_text(json.dumps(state) + "\n", encoding="utf-8")
        older = list_checkpoints(directory)
        os.rename(partial, directory / f"{PREFIX}{step:06d}")
        for path in older:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def leave_out(accelerator, teacher: nn.Module) -> None:
    """The teacher is prepared too (so it sits on the right device), but it never changes: do not save it."""
    def on_save(models, weights, _directory):
        if len(models) == len(weights):
            weights[:] = [w for m, w in zip(models, weights, strict=True) if m is not teacher]

    def on_load(models, _directory):
        models[:] = [m for m in models if m is not teacher]

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def load(accelerator, directory: str | Path, fingerprint: dict) -> dict | None:
    """Restore the last complete checkpoint in ``directory`` (None when there is none); returns its history
    (with its ``step``). A checkpoint from other settings is refused, not half-loaded."""
    found = list_checkpoints(directory)
    if not found:
        return None
    state = json.loads((found[-1] / "history.json").read_text(encoding="utf-8"))
    if state.pop("fingerprint") != fingerprint:
        raise ValueError(f"the checkpoint {found[-1]} was written by a run with other settings or batches: "
                         "resume with the same DistillConfig, batches and number of processes, or give a "
                         "new checkpoint_dir")
    accelerator.load_state(str(found[-1]))
    return state
