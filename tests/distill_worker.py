"""One process of the two-process distillation test (tests/test_distill.py launches it with accelerate).

Each process trains the same tiny student on its share of eight one-row batches; rank 0 writes the loss
curve (the mean over processes) and the final MLP output weights to the JSON path it is given.
"""

from __future__ import annotations

import json
import sys

import torch
from conftest import tiny_llama

from course_utils import distill


def rows(n: int = 8, seq: int = 16, vocab: int = 100) -> list[dict]:
    """``n`` batches of one unpadded row each (equal lengths: every row weighs the same in the mean)."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (n, seq), generator=generator)
    return [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones(1, seq, dtype=torch.long)} for i in range(n)]


CONFIG = dict(steps=3, lr=1e-3, warmup_steps=1, eval_every=0, alpha=0.5, temperature=2.0)


def main(out: str) -> None:
    accelerator = distill.make_accelerator()
    student = tiny_llama(seed=1)
    history = distill.distill(student, tiny_llama(seed=0), rows(), distill.DistillConfig(**CONFIG),
                              accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        weights = {k: v.tolist() for k, v in student.state_dict().items() if "mlp.down_proj" in k}
        json.dump({"processes": accelerator.num_processes, "loss": history.loss, "weights": weights},
                  open(out, "w", encoding="utf-8"))


if __name__ == "__main__":
    main(sys.argv[1])
