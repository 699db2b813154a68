"""The GPT-2 stand-in builder: its loss, and the alignment of the teacher's recorded top-k with sampled tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_utils import build_gpt2_standin as build
from tests.conftest import tiny_llama


def test_distillation_loss_is_cross_entropy_without_the_teacher():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    logp, ids = torch.randn(2, 5, 3), torch.randint(0, 11, (2, 5, 3))
    loss = build.distillation_loss(logits, targets, logp, ids, kd_weight=0.0)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))


def test_distillation_loss_soft_part_is_the_cross_entropy_to_the_teacher():
    torch.manual_seed(1)
    logits, teacher = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    logp, ids = F.log_softmax(teacher, -1).topk(6, dim=-1)  # k = vocabulary: the whole teacher distribution
    soft = build.distillation_loss(logits, torch.zeros(1, 4, dtype=torch.long), logp, ids, kd_weight=1.0)
    expected = -(F.softmax(teacher, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    assert torch.allclose(soft, expected, atol=1e-6)
    # the student that equals the teacher pays exactly the teacher's entropy, and any other pays more
    best = build.distillation_loss(teacher, torch.zeros(1, 4, dtype=torch.long), logp, ids, kd_weight=1.0)
    assert best < soft


def test_teacher_samples_record_the_distribution_each_token_was_drawn_from(tmp_path, monkeypatch):
    teacher = tiny_llama(seed=3)
    monkeypatch.setattr(build, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(build, "sample_prompts", lambda tokenizer, n: [[5 + i] * n for i in range(7)])

    class Tokenizer:
        pad_token_id = 0

    cfg = build.StandinConfig(generated_tokens=5 * 6, prompt_tokens=3, sample_tokens=6, sample_batch=4, top_k=4,
                              bf16=False)
    samples = build.teacher_samples(teacher, Tokenizer(), cfg)
    assert samples["ids"].shape == (5, 9) and samples["logp"].shape == samples["top"].shape == (5, 6, 4)
    # the prompts are kept, and the sampled tokens follow them
    assert samples["ids"][:, :3].unique().numel() == 5
    # recompute the teacher on the finished sequences: position p - 1 + s predicts sampled token s; the sampler
    # never draws end-of-text before the last token (min_new_tokens), so it is masked as it was when sampling
    with torch.no_grad():
        logits = teacher(input_ids=samples["ids"].long()).logits.float()
    logits[..., teacher.config.eos_token_id] = float("-inf")
    logp = F.log_softmax(logits, -1)[:, 2:-1]
    values, ids = logp.topk(4, dim=-1)
    assert torch.equal(ids.int(), samples["top"])
    assert torch.allclose(values.half().float(), samples["logp"].float(), atol=2e-3)
    # cached per batch: a second call reads the same samples back without sampling
    monkeypatch.setattr(teacher, "generate", None)
    again = build.teacher_samples(teacher, Tokenizer(), cfg)
    assert all(torch.equal(again[key], samples[key]) for key in samples)


def test_command_line_records_the_options():
    cfg = build.StandinConfig(epochs=2, lr=1e-3, generated_tokens=614400, init="data/gpt2_standin",
                              calibration_kd=False)
    line = build.command_line(cfg)
    assert line.startswith("python -m course_utils.build_gpt2_standin --epochs 2 --lr 0.001")
    assert "--generated-tokens 614400 --init data/gpt2_standin --no-calibration-kd" in line
    assert "--fp32" not in line
