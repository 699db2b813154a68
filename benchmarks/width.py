"""Width-pruning benchmark: every importance method, the course's method and OptiPFair, at 10/20/40 %.

For SmolLM2 (offline Llama role) and each ratio of MLP neurons removed: parameters, held-out PPL,
last-word accuracy, pruning time and (for the course's method and OptiPFair) decode speed vs base.
OptiPFair (the seeds' author's library) runs side by side on the same model copy, calibration and
held-out text; its best mode is the calibration-based "hybrid" (``neuron_selection_method="MAW"``
with a dataloader). The course's method: OBS selection + least-squares refit done layer by layer on the
pruned model's own activations, towards the unpruned model's layer outputs (``method="obs_sequential"``),
with per-layer ratios from measured damage curves: each layer's calibration-loss increase when it alone loses
5 ... 75 % of its neurons (refitted), on a 16 x 256-token probe drawn apart from the fitting batches
(``surgery.damage_curves``), then the allocation that minimises the summed curves (``surgery.allocate_from_curves``).
The same selection in one pass over the unpruned model's activations (``method="obs"``) is shown next to it.
The report states whether its PPL increase is at most half of OptiPFair's at each ratio.

Run: ``python benchmarks/width.py [--eval-tokens 16384] [--lastword-items 100]`` (``make benchmarks``).
"""

from __future__ import annotations

import copy
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import RESULTS, start_run, write_section  # noqa: E402

from course_utils import data, evaluation, importance, models, surgery  # noqa: E402

RATIOS = (0.1, 0.2, 0.4)
COURSE = "course: sequential obs + refit + curve allocation"
ONE_PASS = "obs + refit + curve allocation (one pass)"
PROBE = dict(n_samples=16, seq_len=256, seed=1)  # the damage-curve probe, drawn apart from the fitting batches
OPTIPFAIR = "optipfair: hybrid (MAW + calibration)"


def main() -> None:
    run = start_run(__doc__.split("\n")[0], calib_samples=256)
    args, base, tokenizer = run.args, run.base, run.tokenizer
    texts, items, calibration = run.texts, run.items, run.calibration

    def measure(model, name, ratio, seconds, speed=False) -> dict:
        row = dict(method=name, ratio=ratio, params=models.count_parameters(model),
                   ppl=evaluation.perplexity(model, tokenizer, texts, max_tokens=args.eval_tokens),
                   lastword=evaluation.last_word_accuracy(model, tokenizer, items), prune_s=seconds)
        if speed:
            row["decode_tok_s"] = evaluation.latency(model, tokenizer, runs=3).decode_tok_s
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        return row

    rows = [measure(base, "unpruned", 0.0, 0.0, speed=True)]
    start = time.perf_counter()
    stats = importance.collect_stats(base, calibration, gram=True)
    stats_s = time.perf_counter() - start
    start = time.perf_counter()
    probe = data.calibration_batches(tokenizer, data.load_texts("calibration", run.profile), **PROBE)
    curves = surgery.damage_curves(base, stats, probe)
    sensitivity_s = time.perf_counter() - start
    print(f"statistics {stats_s:.0f} s, damage curves {sensitivity_s:.0f} s", flush=True)
    allocations = {}

    from optipfair import prune_model

    for ratio in RATIOS:
        for name, scorer in importance.METHODS.items():
            model = copy.deepcopy(base)
            start = time.perf_counter()
            keep = surgery.select_neurons(importance.score_model(model, name, stats=stats), ratio)
            surgery.remove_mlp_neurons(model, keep)
            seconds = time.perf_counter() - start + (stats_s if scorer.needs_data else 0.0)
            rows.append(measure(model, name, ratio, seconds))
        allocation = allocations[ratio] = surgery.allocate_from_curves(curves, ratio)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        surgery.prune_mlp(model, ratio, method="obs", stats=stats, allocation=allocation)
        rows.append(measure(model, ONE_PASS, ratio, time.perf_counter() - start + stats_s + sensitivity_s))
        model = copy.deepcopy(base)
        start = time.perf_counter()
        surgery.prune_mlp(model, ratio, method="obs_sequential", calibration=calibration, allocation=allocation)
        rows.append(measure(model, COURSE, ratio, time.perf_counter() - start + stats_s + sensitivity_s, speed=True))
        model = copy.deepcopy(base)  # OptiPFair prunes in place: its own copy
        start = time.perf_counter()
        prune_model(model, pruning_type="MLP_GLU", neuron_selection_method="MAW", pruning_percentage=100 * ratio,
                    dataloader=calibration, show_progress=False)
        rows.append(measure(model, OPTIPFAIR, ratio, time.perf_counter() - start, speed=True))
    (RESULTS / "width.json").write_text(json.dumps(rows, indent=2))
    write_section(10, "width", "Width pruning (SmolLM2 MLP neurons)", render(rows, args, allocations))


def render(rows: list[dict], args, allocations: dict[float, dict[int, float]]) -> str:
    """Markdown tables, the target check and the PPL-vs-ratio figure."""
    base = rows[0]
    lines = [f"Budget: {args.eval_tokens:,} held-out tokens per PPL, {args.lastword_items} last-word items, "
             f"calibration {args.calib_samples} paragraphs x 256 tokens from the calibration articles. "
             "Decode speed: batch 1, KV cache, median of 3 runs.", "",
             f"Unpruned: {base['params'] / 1e6:.1f} M params, PPL {base['ppl']:.2f}, last-word "
             f"{base['lastword']:.3f}, decode {base['decode_tok_s']:.1f} tok/s.", ""]
    for ratio in RATIOS:
        lines += [f"**{ratio:.0%} of MLP neurons removed**", "",
                  "| method | params (M) | PPL | PPL increase | last-word acc | prune time (s) | decode vs base |",
                  "|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["ratio"] == ratio):
            speed = f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x" if "decode_tok_s" in row else "-"
            lines.append(f"| {row['method']} | {row['params'] / 1e6:.1f} | {row['ppl']:.2f} | "
                         f"+{row['ppl'] - base['ppl']:.2f} | {row['lastword']:.3f} | {row['prune_s']:.1f} | {speed} |")
        lines.append("")
    lines += ["**Target: the course's PPL increase at most half of OptiPFair's hybrid**", "",
              "| ratio | course increase | OptiPFair increase | ratio of increases | met |", "|---|---|---|---|---|"]
    for ratio in RATIOS:
        ours = next(r for r in rows if r["ratio"] == ratio and r["method"] == COURSE)["ppl"] - base["ppl"]
        theirs = next(r for r in rows if r["ratio"] == ratio and r["method"] == OPTIPFAIR)["ppl"] - base["ppl"]
        lines.append(f"| {ratio:.0%} | +{ours:.2f} | +{theirs:.2f} | {ours / theirs:.2f} | "
                     f"{'yes' if ours <= theirs / 2 else 'no'} |")
    lines += ["", "Allocation: per-layer ratios from damage curves measured on a "
              f"{PROBE['n_samples']} x {PROBE['seq_len']}-token probe (`surgery.damage_curves`, "
              "`surgery.allocate_from_curves`), in % of each layer's neurons, layers 0-29:", ""]
    lines += [f"- {ratio:.0%}: " + " ".join(f"{100 * r:.0f}" for r in allocations[ratio].values()) for ratio in RATIOS]
    lines += ["", "![PPL vs ratio](width_ppl_vs_ratio.png)"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        points = [(r["ratio"], r["ppl"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*points, strict=True), marker="o", label=method,
                lw=2.5 if method in (COURSE, OPTIPFAIR) else 1)
    ax.axhline(base["ppl"], color="black", ls="--", lw=1, label="unpruned")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of MLP neurons removed")
    ax.set_ylabel("held-out PPL (log)")
    ax.set_title("SmolLM2-135M width pruning")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "width_ppl_vs_ratio.png", dpi=90)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
