"""Capstone benchmark: every stage of prune -> distil -> int8, both orders of pruning and quantizing, KD vs fine-tuning.

SmolLM2 (offline Llama role) loses a fifth of its decoder layers (lesson 12's depth-only plan: lowest block
influence, kept layers refitted), recovers with ``--steps`` of distillation from the unpruned model, and is then
quantized to int8 weight-only (torchao, through ``TorchAoConfig``, as ``prune --quantize int8`` does). Every stage
gets one row: parameters, bytes on disk, held-out PPL spread over the ten held-out articles (the per-article
range beside it), last-word accuracy, FLOPs of a 128-token forward pass (FLOP counter) and the clock (prefill of
128 tokens, decode of 32 with the KV cache: median and range of ``--runs`` runs, all in this one run).

Two more questions, measured rather than asserted:
- **the order**: quantizing first (int8, weights rounded and dequantized, then pruned, refitted, distilled and
  rounded again) against pruning first;
- **recovery**: distillation against plain fine-tuning at the same steps and tokens, over ``--seeds`` seeds (the
  seed picks the training windows and their order), as the share of the log-PPL gap each closes.

Run: ``python benchmarks/capstone.py [--steps 40] [--recovery-steps 120] [--seeds 2]`` (``make benchmarks``);
a GPU, when present, is used for the model and the training. ``--only order,recovery`` reruns those parts and
reads the others from ``results/capstone.json`` (each part's measurement time is kept and printed in the report);
``--recovery-steps`` gives the KD vs fine-tuning comparison its own, longer, training.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from report import RESULTS, SECTIONS, start_run, write_section  # noqa: E402

from course_utils import arch, data, distill, evaluation, models, pipeline  # noqa: E402


def disk_mb(model) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 1e6


def dequantized(model):
    """A float32 copy whose int8 weights are replaced by their dequantized values (rounded, back in float)."""
    out = copy.deepcopy(model)
    for module in out.modules():  # only the int8 tensors: a plain weight (the tied LM head) keeps its identity
        if isinstance(module, torch.nn.Linear) and type(module.weight.detach()) is not torch.Tensor:
            module.weight = torch.nn.Parameter(module.weight.dequantize().float(), requires_grad=True)
    out.config.quantization_config = None
    if hasattr(out, "hf_quantizer"):
        out.hf_quantizer = None
    return out


PARTS = ("stages", "order", "recovery")


def section_stamp() -> str:
    """When the stored section was measured (its header line), for results stored before per-part stamps."""
    head = (SECTIONS / "60_capstone.md").read_text(encoding="utf-8")
    return re.search(r"_Measured (.+?) on ", head).group(1)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def main() -> None:
    run = start_run(__doc__.split("\n")[0], calib_samples=16,
                    extra=[("--steps", int, 40, "distillation steps of the staged pipeline (4 x 128 tokens each)"),
                           ("--seeds", int, 2, "seeds of the KD vs fine-tuning comparison"),
                           ("--runs", int, 5, "timed runs per stage (after one warm-up)"),
                           ("--lr", float, 2e-4, "peak learning rate"),
                           ("--recovery-steps", int, 120, "steps of the KD vs fine-tuning comparison (0: --steps)"),
                           ("--only", str, "", "comma-separated parts to rerun (stages, order, recovery); the "
                                               "others are read from results/capstone.json")])
    args, base, tokenizer, profile = run.args, run.base, run.tokenizer, run.profile
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    if not parts <= set(PARTS):
        raise SystemExit(f"--only takes a comma-separated subset of {', '.join(PARTS)}; got {args.only!r}")
    previous = json.loads((RESULTS / "capstone.json").read_text()) if parts != set(PARTS) else {}
    if previous and "stages" not in parts and previous["steps"] != args.steps:
        raise SystemExit(f"the stored stages used --steps {previous['steps']}; pass the same to rerun the order")
    measured = dict(previous.get("measured") or dict.fromkeys(PARTS, section_stamp()))
    recovery_steps = args.recovery_steps or args.steps
    base.to(profile.device)
    documents = data.load_documents("evaluation", profile)
    per_doc = max(64, args.eval_tokens // len(documents))
    texts = data.load_texts("calibration", profile)
    n_layers = arch.num_layers(base)
    depth = round(n_layers / 5)
    recipe = pipeline.Recipe(depth=depth, recover="kd", steps=args.steps, lr=args.lr, alpha=0.5, temperature=1.0)
    work = Path(tempfile.mkdtemp(prefix="capstone."))

    def spread(model):
        return evaluation.perplexity_spread(model, tokenizer, documents, tokens_per_document=per_doc)

    def windows(seed):
        return data.token_windows(tokenizer, texts, seq_len=128, batch_size=4, seed=seed)

    def row(name, model, flops_of=None) -> dict:
        times = []
        for _ in range(args.runs):
            lat = evaluation.latency(model, runs=1, warmup=1 if not times else 0)
            times.append((lat.prefill_ms, lat.decode_tok_s))
        s = spread(model)
        r = dict(stage=name, params=models.count_parameters(model), disk_mb=disk_mb(model), ppl=s.ppl,
                 ppl_low=min(s.per_document), ppl_high=max(s.per_document), nll=s.nll,
                 lastword=evaluation.last_word_accuracy(model, tokenizer, run.items),
                 gflops=evaluation.forward_flops(flops_of or model, tokens=128) / 1e9,
                 prefill_ms=statistics.median(t[0] for t in times), prefill_range=(min(t[0] for t in times),
                                                                                    max(t[0] for t in times)),
                 decode_tok_s=statistics.median(t[1] for t in times), decode_range=(min(t[1] for t in times),
                                                                                     max(t[1] for t in times)))
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "nll"}, flush=True)
        return r

    # --- prune first (the course's order) ------------------------------------------------------------
    if "stages" in parts:
        t0 = time.time()
        stages = [row("unpruned", base)]
        student = copy.deepcopy(base)
        layers = pipeline.remove_depth(student, depth, run.calibration)
        stages.append(row(f"pruned: {depth} layers {layers} dropped + refit", student))
        kd_loss = pipeline.recover(student, base, windows(0), recipe, progress=False).loss
        stages.append(row(f"+ KD ({args.steps} steps)", student))
        int8 = pipeline.quantize_int8(student, tokenizer, work / "prune_first")
        stages.append(row("+ int8 weight-only", int8, flops_of=student))
        prune_first_s, measured["stages"] = time.time() - t0, now()
    else:
        stages, kd_loss, prune_first_s = previous["stages"], previous["kd_loss"], previous["prune_first_s"]

    # --- quantize first -----------------------------------------------------------------------------
    if "order" in parts:
        rounded = dequantized(pipeline.quantize_int8(base, tokenizer, work / "base_int8"))
        assert models.count_parameters(rounded) == models.count_parameters(base), "dequantizing untied a weight"
        assert all(type(p.detach()) is torch.Tensor for p in rounded.parameters()), "an int8 weight was left"
        q_student = copy.deepcopy(rounded)
        q_layers = pipeline.remove_depth(q_student, depth, run.calibration)
        pipeline.recover(q_student, base, windows(0), recipe, progress=False)  # the same teacher: the float original
        q_final = pipeline.quantize_int8(q_student, tokenizer, work / "quantize_first")
        order = [row(f"int8 first, then {depth} layers {q_layers} + refit + KD + int8 again", q_final,
                     flops_of=q_student)]
        measured["order"] = now()
    else:
        order = previous["order"]

    # --- KD vs fine-tuning over seeds ------------------------------------------------------------------
    if "recovery" in parts:
        pruned = copy.deepcopy(base)
        pipeline.remove_depth(pruned, depth, run.calibration)
        pruned_ppl = spread(pruned).ppl
        recovery = {"kd": [], "finetune": []}
        for seed in range(args.seeds):
            for method in recovery:
                m = copy.deepcopy(pruned)
                pipeline.recover(m, base if method == "kd" else None, windows(seed),
                                 pipeline.Recipe(depth=depth, recover=method, steps=recovery_steps, lr=args.lr,
                                                 alpha=0.5, temperature=1.0, seed=seed), progress=False)
                s = spread(m)
                recovery[method].append(dict(seed=seed, ppl=s.ppl,
                                             gap=distill.gap_recovered(stages[0]["ppl"], pruned_ppl, s.ppl),
                                             lastword=evaluation.last_word_accuracy(m, tokenizer, run.items)))
                print(method, recovery[method][-1], flush=True)
                del m
        measured["recovery"] = now()
    else:
        recovery, pruned_ppl = previous["recovery"], previous["pruned_ppl"]
        recovery_steps = previous.get("recovery_steps", previous["steps"])

    (RESULTS / "capstone.json").write_text(json.dumps(dict(stages=stages, order=order, recovery=recovery,
                                                           pruned_ppl=pruned_ppl, steps=args.steps,
                                                           recovery_steps=recovery_steps, kd_loss=kd_loss,
                                                           prune_first_s=prune_first_s, measured=measured),
                                                      indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for r in stages + order:
        axes[0].errorbar(r["disk_mb"], r["ppl"], yerr=[[r["ppl"] - r["ppl_low"]], [r["ppl_high"] - r["ppl"]]],
                         fmt="o", capsize=3)
        axes[0].annotate(r["stage"].split(":")[0][:28], (r["disk_mb"], r["ppl"]), fontsize=7, xytext=(4, 2),
                         textcoords="offset points")
    axes[0].set_xlabel("saved weights (MB)")
    axes[0].set_ylabel("held-out PPL (bars: article range)")
    axes[0].set_yscale("log")
    for i, (method, runs) in enumerate(recovery.items()):
        axes[1].scatter([i] * len(runs), [r["gap"] for r in runs], label=method)
    axes[1].set_xticks(range(len(recovery)), list(recovery))
    axes[1].set_ylabel("share of the log-PPL gap closed")
    axes[1].set_title(f"{recovery_steps} steps, {len(recovery['kd'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "capstone.png", dpi=110)

    lines = ["| stage | params (M) | disk (MB) | held-out PPL (article range) | last-word acc. | GFLOP / 128 tok "
             "| prefill ms (range) | decode tok/s (range) |", "|---|---|---|---|---|---|---|---|"]
    for r in stages + order:
        lines.append(f"| {r['stage']} | {r['params'] / 1e6:.1f} | {r['disk_mb']:.0f} | {r['ppl']:.2f} "
                     f"({r['ppl_low']:.1f}-{r['ppl_high']:.1f}) | {r['lastword']:.2f} | {r['gflops']:.1f} "
                     f"| {r['prefill_ms']:.0f} ({r['prefill_range'][0]:.0f}-{r['prefill_range'][1]:.0f}) "
                     f"| {r['decode_tok_s']:.1f} ({r['decode_range'][0]:.1f}-{r['decode_range'][1]:.1f}) |")
    first, last = stages[-1], order[0]
    diffs = [a - b for a, b in zip(last["nll"], first["nll"], strict=True)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    gaps = {m: [r["gap"] for r in runs] for m, runs in recovery.items()}
    kd_mean, ft_mean = statistics.fmean(gaps["kd"]), statistics.fmean(gaps["finetune"])
    spread_runs = max(max(g) - min(g) for g in gaps.values())
    met = kd_mean >= 0.5 and kd_mean - ft_mean > spread_runs

    def listed(values, fmt):
        return ", ".join(format(v, fmt) for v in values)

    text = (
        f"Order: quantizing first and pruning after ends at PPL {last['ppl']:.2f}, pruning first at "
        f"{first['ppl']:.2f} (paired over the {len(documents)} articles: log-PPL {statistics.fmean(diffs):+.3f} "
        f"+/- {se:.3f}). Quantizing first, the refit and the distillation write float weights that have to be "
        f"rounded a second time, and the pruning statistics are measured on the rounded model.\n\n"
        f"Recovery ({recovery_steps} steps of 4 x 128 tokens, {len(recovery['kd'])} seeds): distillation closed "
        f"{kd_mean:.0%} of the log-PPL gap on average (runs {listed(gaps['kd'], '.0%')}), plain fine-tuning "
        f"{ft_mean:.0%} ({listed(gaps['finetune'], '.0%')}); the largest seed-to-seed spread within a method is "
        f"{spread_runs:.0%}. Last-word accuracy after KD: {listed([r['lastword'] for r in recovery['kd']], '.2f')}; "
        f"after fine-tuning: {listed([r['lastword'] for r in recovery['finetune']], '.2f')} (pruned "
        f"{stages[1]['lastword']:.2f}, unpruned {stages[0]['lastword']:.2f}). Target (KD closes at least half the "
        f"gap and beats fine-tuning by more than the seed spread): "
        + ("met." if met else f"not met at {recovery_steps} steps; it needs a longer run (a GPU).")
    )
    body = (f"Lesson 12's depth-only plan ({depth} of {n_layers} layers) on SmolLM2, on {profile.device}. "
            f"PPL: the first {per_doc} tokens of each of the {len(documents)} held-out articles. "
            f"{args.lastword_items} last-word items. Clock: batch 1, median of {args.runs} runs. Measured: "
            + "; ".join(f"{part} {measured[part]}" for part in PARTS) + ".\n\n"
            + "\n".join(lines) + f"\n\n{text}\n\n![capstone](capstone.png)\n")
    write_section(60, "capstone", "Capstone: prune, distil, quantize (lesson 12)", body)


if __name__ == "__main__":
    main()
