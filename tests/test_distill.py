"""distill.py: the KD loss (padding excluded, T^2 scaling, bad input) and the training loop on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_batch, tiny_gpt2, tiny_llama

from course_utils import checkpointing, distill, surgery


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


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_unpadded_fast_path_matches_the_formula_and_its_gradient(temp):
    """No padding (token windows) takes views instead of a gathered copy, and at T = 1 the cross-entropy reuses
    the student's log-probabilities: the same loss and the same gradient as the general formula."""
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    student, teacher = _logits(1).requires_grad_(True), _logits(2)
    loss = distill.kd_loss(student, teacher, ids, None, 0.4, temp)
    loss.total.backward()
    fast_grad, student.grad = student.grad.clone(), None
    s, t = student[:, :-1].reshape(-1, 100), teacher[:, :-1].reshape(-1, 100)
    p = F.softmax(t / temp, -1)
    kl = (p * (p.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    reference = 0.4 * kl + 0.6 * F.cross_entropy(s, ids[:, 1:].reshape(-1))
    reference.backward()
    assert loss.total.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(fast_grad, student.grad, atol=1e-7)
    ones = distill.kd_loss(student, teacher, ids, torch.ones_like(ids), 0.4, temp)  # an all-ones mask: same path
    assert ones.total.item() == pytest.approx(loss.total.item(), rel=1e-6)


def test_adamw_is_fused_on_a_cpu_and_gives_the_loop_s_update():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for make in (lambda ps: distill.adamw(ps, 1e-2, 0.01), lambda ps: torch.optim.AdamW(ps, 1e-2, weight_decay=0.01)):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimiser = make(params)
        for _ in range(3):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimiser.step()
        results.append(params)
    assert distill.adamw([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0).defaults["fused"] is True
    for fused, loop in zip(*results, strict=True):
        assert torch.allclose(fused, loop, atol=1e-6)


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


def _stop_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th loss computation raise KeyboardInterrupt (a run stopped part-way)."""
    original, calls = distill.kd_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(distill, "kd_loss", interrupted)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    teacher, batches = tiny_llama(), [padded_batch(seed=s) for s in range(3)]
    config = distill.DistillConfig(steps=6, lr=1e-3, warmup_steps=2, eval_every=0)
    straight = tiny_llama(seed=1)
    expected = distill.distill(straight, teacher, batches, config, progress=False)

    resumed = tiny_llama(seed=1)
    _stop_at(monkeypatch, 4)  # steps 1-3 done, checkpoint at step 2, stopped inside step 4
    with pytest.raises(KeyboardInterrupt):
        distill.distill(resumed, teacher, batches, config, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    monkeypatch.undo()
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step-000002"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no half-written checkpoint left
    assert not list(tmp_path.glob("step-*/model_1*"))  # the teacher is not saved
    fresh = tiny_llama(seed=1)  # a new process: the weights come from the checkpoint, not from memory
    history = distill.distill(fresh, teacher, batches, config, progress=False, checkpoint_dir=tmp_path,
                              checkpoint_every=2, resume=True)
    assert history.loss == expected.loss  # bit-identical curve: steps 1-2 from the checkpoint, 3-6 retrained
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step-000006"]  # the end is saved too
    with pytest.raises(ValueError, match="other settings or batches"):
        distill.distill(tiny_llama(seed=1), teacher, batches, distill.DistillConfig(steps=6, lr=2e-3),
                        progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        distill.distill(tiny_llama(seed=1), teacher, batches, config, progress=False, resume=True)


def test_two_processes_give_the_one_process_curve_on_the_same_global_batch(tmp_path):
    """accelerate launch, two CPU processes (gloo): DDP averages the gradients of two one-row batches, which is
    the gradient of one process's mean over both rows (equal lengths), so curve and weights must agree."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distill_worker import CONFIG, rows

    here = Path(__file__).resolve().parent
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # --multi_gpu starts torch.distributed.run; on a machine without GPUs each process then takes the gloo backend
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(_free_port()), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    done = subprocess.run([*launch, str(here / "distill_worker.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["processes"] == 2
    single = rows()  # process r takes batches r, r + 2, ...; step t joins the two rows of one global batch
    merged = [{k: torch.cat([single[2 * i][k], single[2 * i + 1][k]]) for k in single[0]} for i in range(4)]
    student = tiny_llama(seed=1)
    history = distill.distill(student, tiny_llama(seed=0), merged, distill.DistillConfig(**CONFIG), progress=False)
    assert ddp["loss"] == pytest.approx(history.loss, rel=1e-5)
    for name, value in ddp["weights"].items():
        assert torch.allclose(torch.tensor(value), student.state_dict()[name], atol=1e-6), name


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
