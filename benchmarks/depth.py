"""Depth-pruning and attention-bypass benchmark: which layers to remove, what it costs, what it buys.

For SmolLM2 (offline Llama role), at 2, 4 and 6 decoder layers removed: every selection strategy of
lesson 04 next to OptiPFair's depth pruning (its ``analyze_layer_importance`` choice: the layers with the
lowest input/output cosine distance), with params, held-out PPL, last-word accuracy and speed (prefill
and KV-cache decode) vs base. The course's method: one-shot block influence, then every kept layer's MLP output
projection refitted by least squares so the pruned model tracks the original's hidden states
(``surgery.drop_layers(..., calibration=..., refit=True)``), still a stock Llama (with ``mlp_bias``). The linear
replacement of ReplaceMe (Shopkhoev et al. 2025) is shown next to it. Selection uses the first 32 calibration
paragraphs; fits use all 256. Then attention bypass (lesson 05) at 4, 8 and 12 sub-layers, chosen
iteratively. The report states whether the course's strategy keeps its PPL increase at most half of
OptiPFair's at each count. Calibration and evaluation text come from different articles.

Run: ``python benchmarks/depth.py [--eval-tokens 16384] [--lastword-items 100]`` (``make benchmarks``).
"""

from __future__ import annotations

import ast
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import RESULTS, start_run, write_section  # noqa: E402

from course_utils import bypass, data, evaluation, importance, models, structure, surgery  # noqa: E402

COUNTS = (2, 4, 6)
BYPASS_COUNTS = (4, 8, 12)
DIRECT = "removal loss, iterative (shortlist)"
COURSE = "course: block influence + refit of the kept layers"
OPTIPFAIR = "optipfair: analyze_layer_importance"
TITLE = "Depth pruning and attention bypass (SmolLM2)"


def main() -> None:
    run = start_run(__doc__.split("\n")[0], calib_samples=256,
                    extra=[("--rows-from", str, None, "render the section from the printed rows of an earlier run's "
                            "log (e.g. a GPU run), re-measuring only speed here (see rows_from_log)")])
    args, profile, base, tokenizer = run.args, run.profile, run.base, run.tokenizer
    texts, items, fit = run.texts, run.items, run.calibration
    calibration = fit[:4]  # the first 32 paragraphs (batches of 8): enough to choose layers, and quicker
    n_layers = base.config.num_hidden_layers
    if args.rows_from:
        rows = rows_from_log(args.rows_from, base, tokenizer)
        influence = importance.block_influence(base, calibration)
        source = (f"PPL, last-word accuracy, parameters and selection times are the rows printed by the run logged in "
                  f"`{args.rows_from}`, parsed, not retyped; prefill and decode speed were re-measured here, on each "
                  "logged structure rebuilt (the same layers removed or bypassed; the parameter counts match the log)")
        (RESULTS / "depth.json").write_text(json.dumps(rows, indent=2))
        write_section(20, "depth", TITLE, render(rows, args, influence, source))
        return

    def measure(model, name, count, kind, layers, seconds) -> dict:
        speed = evaluation.latency(model, tokenizer, runs=3)
        row = dict(method=name, kind=kind, count=count, layers=layers, params=models.count_parameters(model),
                   ppl=evaluation.perplexity(model, tokenizer, texts, max_tokens=args.eval_tokens),
                   lastword=evaluation.last_word_accuracy(model, tokenizer, items), select_s=seconds,
                   prefill_ms=speed.prefill_ms, decode_tok_s=speed.decode_tok_s)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        return row

    rows = [measure(base, "unpruned", 0, "base", [], 0.0)]
    start = time.perf_counter()
    influence = importance.block_influence(base, calibration)
    influence_s = time.perf_counter() - start
    # the direct criterion: a probe batch of 16 x 128 tokens, on the 15 layers of lowest block influence
    probe = data.calibration_batches(tokenizer, data.load_texts("calibration", profile), n_samples=16, seq_len=128,
                                     batch_size=16, seed=1)
    shortlist = influence.argsort()[:15].tolist()

    from optipfair import prune_model
    from optipfair.pruning.depth import analyze_layer_importance

    start = time.perf_counter()
    theirs_scores = analyze_layer_importance(base, calibration, show_progress=False)
    theirs_s = time.perf_counter() - start
    theirs_order = sorted(theirs_scores, key=theirs_scores.get)

    for k in COUNTS:
        choices: dict[str, tuple[list[int], float]] = {
            "drop the last N": (list(range(n_layers - k, n_layers)), 0.0),
            "block influence, one-shot": (sorted(influence.argsort()[:k].tolist()), influence_s),
        }
        start = time.perf_counter()
        distance = importance.angular_distance(base, calibration, k)
        first = int(distance.argmin())
        choices["contiguous block (angular distance)"] = (list(range(first, first + k)), time.perf_counter() - start)
        start = time.perf_counter()
        greedy = importance.greedy_layers(base, importance.block_influence, k, calibration)
        choices["block influence, iterative"] = (sorted(greedy), time.perf_counter() - start)
        start = time.perf_counter()
        greedy = importance.greedy_layers(base, importance.removal_loss, k, probe, candidates=shortlist)
        choices[DIRECT] = (sorted(greedy), time.perf_counter() - start + influence_s)
        for name, (layers, seconds) in choices.items():
            model = copy.deepcopy(base)
            surgery.drop_layers(model, layers)
            rows.append(measure(model, name, k, "depth", layers, seconds))
        compensated = ((COURSE, "block influence, one-shot", True),
                       ("block influence + linear replacement (ReplaceMe)", "block influence, one-shot", False),
                       ("contiguous block + refit of the kept layers", "contiguous block (angular distance)", True),
                       ("contiguous block + linear replacement (ReplaceMe)", "contiguous block (angular distance)",
                        False))
        for name, source, refit in compensated:
            layers, seconds = choices[source]
            model = copy.deepcopy(base)
            start = time.perf_counter()
            surgery.drop_layers(model, layers, calibration=fit, refit=refit)
            rows.append(measure(model, name, k, "depth", layers, seconds + time.perf_counter() - start))
        model = copy.deepcopy(base)  # OptiPFair prunes in place: its own copy
        layers = sorted(theirs_order[:k])
        start = time.perf_counter()
        prune_model(model, pruning_type="DEPTH", layer_indices=layers, show_progress=False)
        rows.append(measure(model, OPTIPFAIR, k, "depth", layers, theirs_s + time.perf_counter() - start))
    for k in BYPASS_COUNTS:
        start = time.perf_counter()
        layers = bypass.choose_bypass(base, calibration[:2], k)
        model = bypass.bypass_attention(copy.deepcopy(base), layers)
        rows.append(measure(model, "attention bypass, iterative", k, "bypass", layers, time.perf_counter() - start))
    (RESULTS / "depth.json").write_text(json.dumps(rows, indent=2))
    write_section(20, "depth", TITLE, render(rows, args, influence))


def rows_from_log(path: str, base, tokenizer) -> list[dict]:
    """The rows an earlier run printed (one dict per line), with speed re-measured on this machine.

    PPL and accuracy do not depend on the device (the CPU and H100 runs agree to three decimals), but speed does,
    and a shared GPU's batch-1 timings say little. Each row's structure is rebuilt from its layer list (refitted
    rows also carry the MLP biases the refit adds); a parameter count that differs from the log stops the run.
    """
    rows = [ast.literal_eval(line) for line in Path(path).read_text().splitlines() if line.startswith("{'method'")]
    if not rows or rows[0]["kind"] != "base":
        raise SystemExit(f"{path}: no rows starting with the unpruned model; pass the log of a depth.py run")
    for row in rows:
        model = base if row["kind"] == "base" else copy.deepcopy(base)
        if row["kind"] == "bypass":
            bypass.bypass_attention(model, row["layers"])
        elif row["kind"] == "depth":
            if "refit" in row["method"]:
                structure.add_mlp_biases(model)
            surgery.drop_layers(model, row["layers"])
        if models.count_parameters(model) != row["params"]:
            raise SystemExit(f"{row['method']} ({row['count']}): rebuilt {models.count_parameters(model)} params, "
                             f"the log says {row['params']}")
        speed = evaluation.latency(model, tokenizer, runs=3)
        row.update(prefill_ms=speed.prefill_ms, decode_tok_s=speed.decode_tok_s)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return rows


def _timing_spread(rows: list[dict]) -> str:
    """A sentence on timing noise: the largest spread among rows whose structures are identical, if any."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows[1:]:
        groups.setdefault((row["kind"], tuple(sorted(row["layers"])), row["params"]), []).append(row)
    twins = [group for group in groups.values() if len(group) > 1]
    if not twins:
        return ""
    prefill, decode = (max(max(r[key] for r in g) / min(r[key] for r in g) - 1 for g in twins)
                       for key in ("prefill_ms", "decode_tok_s"))
    return (" Rows with identical structures (the same layers removed, the same parameter count) differ by up to "
            f"{prefill:.0%} in prefill and {decode:.0%} in decode speed here: read smaller differences as noise.")


def render(rows: list[dict], args, influence, source: str | None = None) -> str:
    """Markdown tables, the target check and the PPL / speed figure (``source``: where the rows came from)."""
    base = rows[0]
    lines = [f"{source}.", ""] if source else []
    lines += [f"Budget: {args.eval_tokens:,} held-out tokens per PPL, {args.lastword_items} last-word items, "
             f"calibration {args.calib_samples} paragraphs x 256 tokens from the calibration articles (layer "
             "choices use the first 32 of them; the refit and the linear replacement are fitted on all). "
             "Speed: batch 1, 128-token prompt, 32 decoded tokens with the KV cache, median of 3 runs.", "",
             f"Unpruned: {base['params'] / 1e6:.1f} M params, PPL {base['ppl']:.2f}, last-word "
             f"{base['lastword']:.3f}, prefill {base['prefill_ms']:.0f} ms, "
             f"decode {base['decode_tok_s']:.1f} tok/s.", "",
             "| removed | method | layers | params (M) | PPL | PPL increase | last-word | prefill vs base | "
             "decode vs base | selection (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows[1:]:
        what = f"{row['count']} layers" if row["kind"] == "depth" else f"{row['count']} attention"
        lines.append(f"| {what} | {row['method']} | {row['layers']} | {row['params'] / 1e6:.1f} | {row['ppl']:.2f} | "
                     f"+{row['ppl'] - base['ppl']:.2f} | {row['lastword']:.3f} | "
                     f"{base['prefill_ms'] / row['prefill_ms']:.2f}x | "
                     f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
                     f"{row['select_s']:.0f} |")
    lines += ["", "Speed columns are speed-ups (higher is faster), measured in this run." + _timing_spread(rows), "",
              "**Target: the course's PPL increase at most half of OptiPFair's choice**", "",
              "| layers removed | course increase | OptiPFair increase | ratio of increases | met |",
              "|---|---|---|---|---|"]
    for k in COUNTS:
        ours = next(r for r in rows if r["count"] == k and r["method"] == COURSE)["ppl"] - base["ppl"]
        theirs = next(r for r in rows if r["count"] == k and r["method"] == OPTIPFAIR)["ppl"] - base["ppl"]
        met = "yes" if ours <= theirs / 2 else "no"
        lines.append(f"| {k} | +{ours:.2f} | +{theirs:.2f} | {ours / theirs:.2f} | {met} |")
    lines += ["", "Block influence per layer (1 - cos(input, output), calibration tokens): "
              + ", ".join(f"{i}: {s:.3f}" for i, s in enumerate(influence.tolist())), "",
              "![PPL and speed vs layers removed](depth_ppl_speed.png)"]
    figure(rows)
    return "\n".join(lines)


def figure(rows: list[dict]) -> None:
    """PPL increase of the methods that stay near the base (linear axis; the others named in the title) and the
    clock's decode speed; one colour per method, the legend below the data."""
    from width import method_colours, save_figure

    base = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    colours = method_colours(methods, (COURSE, OPTIPFAIR))
    worst = {m: max(r["ppl"] for r in rows if r["method"] == m) for m in methods}
    far = [m for m in methods if worst[m] >= 4 * base["ppl"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(wspace=0.3))
    for method in methods:
        points = sorted((r["count"], r["ppl"], r["decode_tok_s"] / base["decode_tok_s"]) for r in rows
                        if r["method"] == method)
        counts, ppls, speeds = zip(*points, strict=True)
        style = dict(marker="o", color=colours[method], label=method, lw=2.5 if method in (COURSE, OPTIPFAIR) else 1)
        if method not in far:
            left.plot(counts, [p / base["ppl"] - 1 for p in ppls], **style)
        right.plot(counts, speeds, **style)
    left.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    left.set_ylabel("PPL increase over the unpruned model")
    left.set_title("PPL" + "".join(f"; off the chart: {m} (up to {worst[m]:,.0f})" for m in far), fontsize=9)
    right.axhline(1.0, color="black", ls="--", lw=1)
    right.set_ylabel("decode speed / unpruned (clock, batch 1)")
    right.set_title("decode speed (one run's clock: see the table's spread)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("layers removed (attention sub-layers for bypass)")
    save_figure(fig, right, "SmolLM2-135M: depth pruning and attention bypass", len(methods), "depth_ppl_speed.png",
                top=0.84)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--replot"]:  # redraw the figure from results/depth.json (no model, no measurement)
        figure(json.loads((RESULTS / "depth.json").read_text()))
    else:
        main()
