"""distill.py: the KD loss (padding excluded, T^2 scaling, bad input) and the training loop on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, tiny_gpt2, tiny_llama

from course_utils import distill, surgery


def _logits(seed: int, shape=(3, 10, 100)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_padding_does_not_change_the_loss():
    batch = padded_batch()
    student, teacher = _logits(1), _logits(2)
    base = distill.kd_loss(student, teacher, batch["input_ids"], batch["attention_mask"], alpha=0.5, temperature=2.0)
    pad = batch["attention_mask"] == 0
    noisy_student = student.masked_fill(pad.unsqueeze(-1), 50.0)  # garbage at padded positions
    noisy_teacher = teacher.masked_fill(pad.unsqueeze(-1), -50.0)
    other_ids = batch["input_ids"].masked_fill(pad, 7)  # a different pad id
    noisy = distill.kd_loss(noisy_student, noisy_teacher, other_ids, batch["attention_mask"], 0.5, 2.0)
    assert torch.allclose(base.total, noisy.total)
    assert base.soft == pytest.approx(noisy.soft) and base.hard == pytest.approx(noisy.hard)


def test_padded_row_equals_the_row_alone():
    batch = padded_batch()
    student, teacher = _logits(1), _logits(2)
    row, n = 2, int(batch["attention_mask"][2].sum())
    alone = distill.kd_loss(student[row:row + 1, :n], teacher[row:row + 1, :n], batch["input_ids"][row:row + 1, :n])
    masked_others = batch["attention_mask"].clone()
    masked_others[:row] = 0
    padded = distill.kd_loss(student, teacher, batch["input_ids"], masked_others)
    assert torch.allclose(alone.total, padded.total, atol=1e-6)


def test_loss_matches_the_formula():
    batch = padded_batch()
    student, teacher = _logits(1), _logits(2)
    alpha, temp = 0.3, 3.0
    loss = distill.kd_loss(student, teacher, batch["input_ids"], batch["attention_mask"], alpha, temp)
    mask = distill.target_mask(batch["attention_mask"], batch["input_ids"])
    s, t = student[:, :-1][mask], teacher[:, :-1][mask]
    p = F.softmax(t / temp, -1)
    kl = (p * (p.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    ce = F.cross_entropy(s, batch["input_ids"][:, 1:][mask])
    assert loss.total.item() == pytest.approx((alpha * kl + (1 - alpha) * ce).item(), rel=1e-5)


def test_identical_logits_give_zero_soft_loss():
    logits = _logits(3)
    loss = distill.kd_loss(logits, logits.clone(), torch.randint(0, 100, (3, 10)), alpha=1.0)
    assert loss.soft == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("alpha, temperature", [(-0.1, 2.0), (1.5, 2.0), (0.5, 0.0), (0.5, -1.0)])
def test_bad_weights_raise(alpha, temperature):
    with pytest.raises(ValueError, match="alpha|temperature"):
        distill.kd_loss(_logits(1), _logits(2), torch.zeros(3, 10, dtype=torch.long), alpha=alpha,
                        temperature=temperature)
    with pytest.raises(ValueError, match="alpha|temperature"):
        distill.DistillConfig(alpha=alpha, temperature=temperature)


def test_all_padding_raises():
    with pytest.raises(ValueError, match="padding"):
        distill.kd_loss(_logits(1), _logits(2), torch.zeros(3, 10, dtype=torch.long), torch.zeros(3, 10))


def test_different_vocabularies_raise():
    teacher, student = tiny_llama(), tiny_llama(vocab_size=120)
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill.check_pair(teacher, student)
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill.distill(student, teacher, [padded_batch()], distill.DistillConfig(steps=1), progress=False)


def test_different_tokenizers_raise():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    with pytest.raises(ValueError, match="tokenizers"):
        distill.check_pair(tiny_llama(), tiny_llama(seed=1), Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}))
    distill.check_pair(tiny_llama(), tiny_llama(seed=1), Tok({"a": 0}), Tok({"a": 0}))


def test_hidden_loss_needs_layers_and_valid_indices():
    with pytest.raises(ValueError, match="hidden_layers"):
        distill.DistillConfig(hidden_weight=1.0)
    config = distill.DistillConfig(steps=1, hidden_weight=1.0, hidden_layers={5: 0})
    with pytest.raises(ValueError, match="out of range|layer"):
        distill.distill(tiny_llama(seed=1), tiny_llama(), [padded_batch()], config, progress=False)


def test_plain_finetuning_needs_no_teacher_and_kd_does():
    with pytest.raises(ValueError, match="teacher"):
        distill.distill(tiny_llama(), None, [padded_batch()], distill.DistillConfig(steps=1), progress=False)
    history = distill.distill(tiny_llama(), None, [padded_batch()], distill.DistillConfig(steps=2, alpha=0.0),
                              progress=False)
    assert len(history.loss) == 2 and history.soft == [0.0, 0.0]


def test_empty_batches_raise():
    with pytest.raises(ValueError, match="no training batches"):
        distill.distill(tiny_llama(), tiny_llama(), [], distill.DistillConfig(steps=1), progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kd_pulls_a_pruned_student_towards_its_teacher(family):
    """After 30 steps the student's soft loss against the teacher on an unseen batch has fallen by 30 %."""
    make = tiny_gpt2 if family == "gpt2" else tiny_llama
    teacher, student = make(), make(seed=1)  # a different model, then pruned: far from the teacher
    surgery.prune_mlp(student, 0.5, method="l1")
    batches = [padded_batch(seed=s) for s in range(4)]
    probe = padded_batch(seed=99)

    def gap(model) -> float:  # soft loss against the teacher on a fixed probe batch
        with torch.no_grad():
            return distill.kd_loss(model(**probe).logits, teacher(**probe).logits, probe["input_ids"],
                                   probe["attention_mask"], alpha=1.0).soft

    ids_before = {id(p) for p in student.parameters()}
    config = distill.DistillConfig(steps=30, lr=3e-3, warmup_steps=3, alpha=1.0, eval_every=10)
    history = distill.distill(student, teacher, batches, config, evaluate=gap, progress=False)
    assert history.eval_steps == [0, 10, 20, 30]
    assert history.final_score < 0.7 * history.eval_scores[0]
    assert {id(p) for p in student.parameters()} == ids_before  # trained in place, no copy
    assert all(not p.requires_grad or p.grad is None for p in teacher.parameters())
    assert not student.training


def test_hidden_state_term_runs_and_is_logged():
    teacher, student = tiny_llama(), tiny_llama(seed=1)
    config = distill.DistillConfig(steps=3, hidden_weight=0.5, hidden_layers={0: 0, 1: 1})
    history = distill.distill(student, teacher, [padded_batch()], config, progress=False)
    assert len(history.loss) == 3 and all(math.isfinite(x) for x in history.loss)


def test_freeze_all_but_mlp():
    model = tiny_llama()
    n = distill.freeze_all_but_mlp(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in name for name in trainable)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_schedule_warms_up_then_decays_to_zero():
    f = distill.lr_lambda(warmup_steps=4, total_steps=20)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(10) < f(5) and f(20) == pytest.approx(0.0, abs=1e-9)


def test_gap_recovered():
    assert distill.gap_recovered(10.0, 20.0, 10.0) == pytest.approx(1.0)
    assert distill.gap_recovered(10.0, 20.0, 20.0) == pytest.approx(0.0)
    assert distill.gap_recovered(10.0, 20.0, 15.0, log=False) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no gap"):
        distill.gap_recovered(10.0, 9.0, 9.5)


def test_teacher_cache_gives_the_uncached_result_and_runs_the_teacher_once_per_batch():
    teacher = tiny_llama()
    batches = [padded_batch(seed=s) for s in range(3)]
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    cache = distill.TeacherCache(teacher, batches)
    runs = [dict(alpha=0.5), dict(alpha=1.0, temperature=2.0),
            dict(alpha=0.5, hidden_weight=0.5, hidden_layers={0: 0, 1: 1})]
    for overrides in runs:
        config = distill.DistillConfig(steps=5, lr=1e-3, warmup_steps=1, eval_every=0, **overrides)
        plain = distill.distill(tiny_llama(seed=1), teacher, batches, config, progress=False)
        cached = distill.distill(tiny_llama(seed=1), teacher, batches, config, progress=False, teacher_cache=cache)
        assert cached.loss == plain.loss and cached.soft == plain.soft  # bit-identical
    # uncached runs: 3 x 5 teacher passes; cached: 3 batches once, then 3 again for the hidden states
    assert len(calls) == 3 * 5 + 3 + 3
    filled = distill.TeacherCache(teacher, batches)
    filled.fill(distill.DistillConfig(steps=2))  # two steps visit two of the three batches
    distill.distill(tiny_llama(seed=1), teacher, batches, distill.DistillConfig(steps=2), progress=False,
                    teacher_cache=filled)  # ... and the run then finds both in the cache
    handle.remove()
    assert len(filled.logits) == 2 and len(calls) == 3 * 5 + 3 + 3 + 2
    with pytest.raises(ValueError, match="another teacher or another list"):
        distill.distill(tiny_llama(seed=1), teacher, list(batches), distill.DistillConfig(steps=1),
                        progress=False, teacher_cache=cache)
