"""Recovery benchmark: how much of the pruning damage knowledge distillation wins back.

SmolLM2 (offline Llama role) is width-pruned with lesson 03's recipe (OBS selection + least-squares refit,
a uniform width rounded to 64, so the model stays a stock Llama) at ``--ratio`` of its MLP neurons. The
pruned model is then trained for ``--steps`` optimiser steps on the same token windows of the calibration
articles in three ways: plain cross-entropy fine-tuning (alpha = 0), and knowledge distillation from the
unpruned model (alpha 0.5 as in lesson 07, and alpha 1). Rows: base, pruned, each recovery, with params,
held-out PPL, last-word accuracy and the share of the (log-)PPL gap recovered. Training and evaluation text
come from different articles. A GPU, when present, is used automatically (more steps are then cheap).

Run: ``python benchmarks/recovery.py [--ratio 0.4] [--steps N] [--eval-tokens 16384]`` (``make benchmarks``);
on several GPUs: ``accelerate launch --num_processes 4 benchmarks/recovery.py --steps 2000``.
"""

from __future__ import annotations

import copy
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import RESULTS, start_run, write_section  # noqa: E402

from course_utils import data, distill, evaluation, importance, models, surgery  # noqa: E402

RUNS = {  # name -> DistillConfig overrides; both see the same batches in the same order
    "pruned + fine-tune (CE)": dict(alpha=0.0),
    "pruned + KD (alpha 0.5, T 1)": dict(alpha=0.5, temperature=1.0),  # lesson 07's choice
    "pruned + KD (alpha 1, T 1)": dict(alpha=1.0, temperature=1.0),  # the teacher's term alone
}


def main() -> None:
    run = start_run(__doc__.split("\n")[0], calib_samples=64,
                    extra=[("--ratio", float, 0.4, "share of MLP neurons removed"),
                           ("--steps", int, None, "optimiser steps per run (default: 100 on a CPU, 1000 on a GPU)"),
                           ("--seq-len", int, None, "tokens per training window (default: 128 on a CPU, 512 on a GPU)"),
                           ("--batch-size", int, 4, "windows per step"),
                           ("--lr", float, 2e-4, "peak learning rate")])
    args, base, tokenizer = run.args, run.base, run.tokenizer
    device = run.profile.device
    on_gpu = device.type == "cuda"
    args.steps = args.steps or (1000 if on_gpu else 100)
    args.seq_len = args.seq_len or (512 if on_gpu else 128)
    base.to(device)

    def ppl(model) -> float:
        return evaluation.perplexity(model, tokenizer, run.texts, max_tokens=args.eval_tokens)

    def row(model, name, history=None) -> dict:
        r = dict(method=name, params=models.count_parameters(model), ppl=ppl(model),
                 lastword=evaluation.last_word_accuracy(model, tokenizer, run.items),
                 train_s=history.seconds if history else 0.0)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        return r

    rows = [row(base, "base")]
    stats = importance.collect_stats(base, run.calibration, gram=True)
    pruned = copy.deepcopy(base)
    report = surgery.prune_mlp(pruned, args.ratio, method="obs", multiple_of=64, stats=stats)
    rows.append(row(pruned, f"pruned: {report.method} + refit, {args.ratio:.0%} of MLP neurons"))
    train = data.token_windows(tokenizer, data.load_texts("calibration", run.profile), seq_len=args.seq_len,
                               batch_size=args.batch_size, seed=0)
    histories = {}
    for name, overrides in RUNS.items():
        student = copy.deepcopy(pruned)
        config = distill.DistillConfig(steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20),
                                       eval_every=max(1, args.steps // 5), **overrides)
        history = distill.distill(student, base if config.alpha > 0 else None, train, config,
                                  evaluate=lambda m: evaluation.perplexity(m, tokenizer, run.texts, max_tokens=4096),
                                  name=name, progress=False)
        histories[name] = history
        rows.append(row(student, name, history))
        del student

    b, p = rows[0]["ppl"], rows[1]["ppl"]
    for r in rows[2:]:
        r["gap_recovered"] = distill.gap_recovered(b, p, r["ppl"])
    (RESULTS / "recovery.json").parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(rows, indent=1))

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, history in histories.items():
        ax.plot(history.eval_steps, history.eval_scores, marker="o", label=name)
    ax.axhline(b, color="grey", ls="--", label="base")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out PPL (4,096 tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "recovery.png", dpi=110)

    lines = ["| model | params (M) | held-out PPL | last-word acc. | gap recovered | train time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        gap = f"{r['gap_recovered']:.0%}" if "gap_recovered" in r else "-"
        lines.append(f"| {r['method']} | {r['params'] / 1e6:.1f} | {r['ppl']:.2f} | {r['lastword']:.3f} | {gap} "
                     f"| {r['train_s']:.0f} |")
    ce, kd = rows[2], max(rows[3:], key=lambda r: r["gap_recovered"])
    verdict = (f"Best KD run ({kd['method']}) recovered {kd['gap_recovered']:.0%} of the log-PPL gap, plain "
               f"fine-tuning {ce['gap_recovered']:.0%}, with the same {args.steps} steps of "
               f"{train[0]['input_ids'].numel():,} tokens on {device}.")
    body = (f"Width-pruned SmolLM2 ({args.ratio:.0%} of MLP neurons, lesson 03's recipe), then recovered "
            f"({args.steps} AdamW steps, lr {args.lr}, batch {args.batch_size} x {args.seq_len} tokens from the "
            f"calibration articles; 'gap recovered' is measured on log-PPL). Budget: {args.eval_tokens:,} held-out "
            f"tokens per PPL, {args.lastword_items} last-word items.\n\n" + "\n".join(lines)
            + f"\n\n{verdict}\n\n![recovery](recovery.png)\n")
    write_section(40, "recovery", "Knowledge-distillation recovery (lesson 07)", body)


if __name__ == "__main__":
    main()
