"""Build the offline GPT-2 stand-in: a small GPT2LMHeadModel distilled from SmolLM2 on the calibration text.

No GPT-2-architecture pretrained weights can be installed offline, so the course makes one, the way
distilGPT2 itself was made: a student with GPT-2's structure (``Conv1D`` c_fc/c_proj, LayerNorm, biases,
learned positions) learns from a teacher. Here the teacher is SmolLM2-135M-Instruct and the student uses
its tokenizer.

Recipe (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):
1. the teacher reads the calibration pool once, in 512-token windows; its top-k next-token
   log-probabilities are cached (``COURSE_CACHE``);
2. the student's token embeddings start from the teacher's, projected to the student width by PCA;
3. the student minimises 0.5 x soft cross-entropy against the teacher's top-k distribution
   + 0.5 x cross-entropy on the true next token, with AdamW and a warm-up + cosine schedule;
4. weights are saved in fp16 with a model card stating the held-out perplexity reached.

Run: ``python -m course_utils.build_gpt2_standin [--out data/gpt2_standin] [--epochs 4]``.
Deterministic for a given seed and machine; reproducible on CPU. Measured on a 2-core CPU: the teacher pass
over the 396,288 calibration tokens took ~45 min (cached afterwards) and training ~2.3 s per step, 194 steps
per epoch. The shipped 4-epoch build reached held-out PPL 418 / 309 / 267 / 266 after epochs 1-4 (first
4,096 held-out tokens) and 391 on the whole held-out split: short of the < 100 aimed for, and flattening,
so more epochs alone will not get there; a larger student or more text (on a GPU) is the next step.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from . import data, evaluation, models
from .profiles import cache_dir, setup


@dataclass
class StandinConfig:
    """Student size and training budget."""

    n_embd: int = 256  # model width (teacher: 576)
    n_layer: int = 6  # decoder layers (teacher: 30)
    n_head: int = 4  # heads of 64 dims
    n_inner: int = 1024  # MLP width: the classic 4 x n_embd
    seq_len: int = 512  # training window = evaluation window
    top_k: int = 32  # teacher log-probabilities kept per position
    batch_size: int = 4  # sequences per optimiser step (more, smaller steps learn faster on 0.4 M tokens)
    epochs: int = 4  # the shipped build (the held-out PPL had flattened by the fourth)
    lr: float = 2e-3
    warmup_steps: int = 50
    monitor_tokens: int = 4096  # held-out tokens for the per-epoch perplexity printout
    kd_weight: float = 0.5  # share of the soft (teacher) loss; the rest is plain cross-entropy
    seed: int = 0


def training_windows(tokenizer, seq_len: int) -> torch.Tensor:
    """The calibration pool as a token stream cut into (n_windows, seq_len) training windows."""
    ids = evaluation.token_stream(tokenizer, data.load_texts("calibration", "offline"))
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # (n_windows, seq_len)


@torch.no_grad()
def teacher_topk(teacher, windows: torch.Tensor, top_k: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k log-probabilities and token ids for every position: two (n, seq_len, top_k) tensors."""
    path = cache_dir() / f"standin_teacher_top{top_k}_{tuple(windows.shape)}.pt"
    if path.exists():
        cached = torch.load(path)
        return cached["logp"], cached["ids"]
    all_logp, all_ids = [], []
    start = time.time()
    for i in range(0, len(windows), batch_size):
        logp = F.log_softmax(teacher(input_ids=windows[i:i + batch_size]).logits.float(), dim=-1)
        values, ids = logp.topk(top_k, dim=-1)  # (batch, seq_len, top_k)
        all_logp.append(values.half())
        all_ids.append(ids.int())
        if i % (batch_size * 20) == 0:
            print(f"  teacher {i}/{len(windows)} windows, {time.time() - start:.0f} s", flush=True)
    logp, ids = torch.cat(all_logp), torch.cat(all_ids)
    tmp = path.with_suffix(".tmp")
    torch.save({"logp": logp, "ids": ids}, tmp)
    tmp.replace(path)
    return logp, ids


def pca_embeddings(teacher_embeddings: torch.Tensor, width: int) -> torch.Tensor:
    """Project the teacher's (vocab, d) embeddings onto their top ``width`` principal directions."""
    centred = teacher_embeddings.float() - teacher_embeddings.float().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v: (d, d), rows are directions
    projected = centred @ v[:width].T  # (vocab, width)
    return projected * (0.05 / projected.std())  # GPT-2-like scale


def student_config(cfg: StandinConfig, tokenizer) -> GPT2Config:
    """The stand-in's GPT-2 config (tied embeddings, SmolLM2's vocabulary)."""
    return GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=cfg.n_inner, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logp: torch.Tensor,
                      teacher_ids: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """kd_weight x soft cross-entropy vs the teacher's renormalised top-k + (1 - kd_weight) x hard CE."""
    logq = F.log_softmax(logits.float(), dim=-1)  # (batch, seq - 1, vocab)
    p_teacher = F.softmax(teacher_logp.float(), dim=-1)  # renormalised over the top-k
    soft = -(p_teacher * logq.gather(-1, teacher_ids.long())).sum(-1).mean()
    hard = F.nll_loss(logq.reshape(-1, logq.size(-1)), targets.reshape(-1))
    return kd_weight * soft + (1 - kd_weight) * hard


def build(out: Path, cfg: StandinConfig) -> dict:
    """Distil the stand-in into ``out``; returns the measured numbers written to its model card."""
    profile = setup("offline", seed=cfg.seed, verbose=False)
    teacher, tokenizer = models.load_model("llama", profile)
    windows = training_windows(tokenizer, cfg.seq_len)
    print(f"{len(windows)} training windows of {cfg.seq_len} tokens ({windows.numel():,} tokens)")
    teacher_logp, teacher_ids = teacher_topk(teacher, windows, cfg.top_k)
    torch.manual_seed(cfg.seed)
    student = GPT2LMHeadModel(student_config(cfg, tokenizer))
    with torch.no_grad():
        student.transformer.wte.weight.copy_(pca_embeddings(teacher.get_input_embeddings().weight, cfg.n_embd))
    del teacher
    student.train()
    steps_per_epoch = math.ceil(len(windows) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    optimiser = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(cfg.seed)
    held_out = data.load_texts("evaluation", profile)
    step, start = 0, time.time()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(windows), generator=generator)
        for i in range(0, len(windows), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            batch = windows[idx]  # (batch, seq_len)
            logits = student(input_ids=batch).logits[:, :-1]  # predict positions 1..seq_len-1
            loss = distillation_loss(logits, batch[:, 1:], teacher_logp[idx, :-1], teacher_ids[idx, :-1],
                                     cfg.kd_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            if step % 20 == 0 or step == total:
                print(f"  epoch {epoch} step {step}/{total} loss {loss.item():.3f} {time.time() - start:.0f} s",
                      flush=True)
        student.eval()
        monitor = evaluation.perplexity(student, tokenizer, held_out, window=cfg.seq_len, max_tokens=cfg.monitor_tokens)
        print(f"epoch {epoch}: held-out PPL {monitor:.1f} on {cfg.monitor_tokens} tokens", flush=True)
        student.train()
    student.eval()
    ppl = evaluation.perplexity(student, tokenizer, held_out, window=cfg.seq_len)
    acc = evaluation.last_word_accuracy(student, tokenizer, evaluation.lastword_items(profile, n_items=0))
    sample = evaluation.generate(student, tokenizer, "The history of the city", max_new_tokens=30)
    student.half().save_pretrained(out)
    tokenizer.save_pretrained(out)
    numbers = dict(ppl=ppl, lastword_acc=acc, params=models.count_parameters(student),
                   train_tokens=windows.numel() * cfg.epochs, minutes=(time.time() - start) / 60, sample=sample)
    write_card(out, cfg, numbers)
    return numbers


def write_card(out: Path, cfg: StandinConfig, numbers: dict) -> None:
    """The model card: what the stand-in is, how it was made, what it measures."""
    card = f"""# GPT-2 stand-in (offline profile of the course)

A {numbers['params'] / 1e6:.1f} M-parameter `GPT2LMHeadModel` (real `Conv1D` c_fc/c_proj, LayerNorm, biases,
learned positions; {cfg.n_layer} layers, width {cfg.n_embd}, MLP {cfg.n_inner}, {cfg.n_head} heads, context
{cfg.seq_len}) with SmolLM2's tokenizer, distilled from SmolLM2-135M-Instruct on the calibration pool of the
course's Wikipedia excerpt (never on the held-out articles). It plays distilgpt2 in the offline profile.
Built by `python -m course_utils.build_gpt2_standin` ({cfg.epochs} epochs, {numbers['train_tokens']:,} training
tokens, {numbers['minutes']:.0f} min on the build machine's CPU); weights stored in fp16.

| measured on the held-out split | value |
|---|---|
| perplexity (512-token windows, whole split) | {numbers['ppl']:.1f} |
| last-word accuracy (all items) | {numbers['lastword_acc']:.3f} |

Greedy sample, prompt "The history of the city": {numbers['sample']!r}

Training data: English Wikipedia (CC BY-SA), read from the gensim package. Teacher: SmolLM2-135M-Instruct
(Apache-2.0). For teaching only: a small model trained on ~0.4 M tokens knows little about the world.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=models.GPT2_STANDIN_DIR)
    parser.add_argument("--epochs", type=int, default=StandinConfig.epochs)
    args = parser.parse_args()
    numbers = build(args.out, StandinConfig(epochs=args.epochs))
    print({k: v for k, v in numbers.items()})


if __name__ == "__main__":
    main()
