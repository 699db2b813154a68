"""Width-pruning benchmark: every importance method, the course's recipes and OptiPFair, at 10/20/40 %.

For SmolLM2 (offline Llama role) and each ratio of MLP neurons removed: parameters, held-out PPL (Wikipedia
evaluation articles, and the Lee news corpus as a second domain never used for calibration), last-word
accuracy, the whole pruning time (statistics + allocation + selection + refit) and, for the main rows, decode
speed vs base. OptiPFair (the seeds' author's library) runs side by side on the same model copy, calibration
and held-out text; its best mode is the calibration-based "hybrid" (``neuron_selection_method="MAW"`` with a
dataloader).

The course's recipes differ in where the per-layer ratios come from (``surgery.allocate_from_curves``):
- exact: damage curves measured at 9 ratios per layer on a 16 x 256-token probe (``surgery.damage_curves``),
  then OBS selection + least-squares refit layer by layer on the pruned model's own activations
  (``method="obs_sequential"``), or in one pass over the unpruned model's statistics (``method="obs"``);
- default (fast): each layer's closed-form refit residual at every ratio (``surgery.residual_curves``, no
  forward pass) scaled by one refitted probe at 75 % on 4 x 128 tokens, each layer's scale the median over the
  5 layers around it (``surgery.calibrated_curves``), on a smaller calibration, then sequential OBS selection +
  refit reading the unpruned model's layer outputs recorded during the statistics pass
  (``streams.recording_outputs``), so only the pruned stream runs. The one-pass variant and other calibration
  sizes are shown next to it, with the cost of every step. The sequential default was chosen on validation text
  (results/logs/width_ood_probe_2026-12-05, probe 4), not on the held-out articles or the news.
The report checks the default recipe's targets: PPL increase at most half of OptiPFair's, in domain and on
news, and prune time at most 2x OptiPFair's, measured in the same run.

Run: ``python benchmarks/width.py [--eval-tokens 16384] [--lastword-items 100]`` (``make benchmarks``, about
90 min on 2 cores); ``--only fast`` reruns the unpruned row, the fast recipes and OptiPFair (23 min on 2 quiet
cores, 2026-12-05) and reads the exact recipe and the importance methods from ``results/width.json``;
``--render`` rewrites the report section (and the fast rows' labels, after a change of ``FAST_CALIB``'s default
size) from ``results/width.json`` without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import RESULTS, measured_line, start_run, write_section  # noqa: E402

from course_utils import data, evaluation, importance, models, streams, surgery  # noqa: E402

RATIOS = (0.1, 0.2, 0.4)
COURSE = "course exact: sequential obs + refit + measured curves"
ONE_PASS = "obs + refit + measured curves (one pass)"
PROBE = dict(n_samples=16, seq_len=256, seed=1)  # the damage-curve probe, drawn apart from the fitting batches
OPTIPFAIR = "optipfair: hybrid (MAW + calibration)"
# the fast recipe: Gram statistics on a smaller calibration, residual curves scaled by one refitted probe per layer
FAST_PROBE = dict(n_samples=4, seq_len=128, seed=1)
# a probe at 30 % read below its own noise on several layers (results/logs/width_alloc_probe_2026-12-05)
FAST_PROBE_RATIO = 0.75
FAST_SMOOTH = 5  # each layer's scale: the median over this many neighbouring layers
FAST_CALIB = "128,64,256"  # calibration paragraphs of the fast recipe; the first size is the default recipe
EXACT_METHODS = (COURSE, ONE_PASS, *importance.METHODS)


def fast_name(samples: int, method: str, default_samples: int) -> str:
    """The row label of a fast recipe; the default is sequential OBS on the first calibration size."""
    kind = "one pass" if method == "obs" else "sequential"
    label = "course default" if (samples, method) == (default_samples, "obs_sequential") else "course fast"
    return f"{label}: obs + refit + calibrated curves ({kind}, {samples} x 256 calibration)"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def main() -> None:
    run = start_run(__doc__.split("\n")[0], calib_samples=256,
                    extra=[("--only", str, "", "'fast': rerun the unpruned row, the fast recipes and OptiPFair; "
                                               "the exact recipe and the importance methods are read from "
                                               "results/width.json"),
                           ("--fast-calib", str, FAST_CALIB, "calibration sizes (the first: the default recipe)")])
    args, base, tokenizer = run.args, run.base, run.tokenizer
    texts, items, calibration = run.texts, run.items, run.calibration
    if args.only not in ("", "fast"):
        raise SystemExit(f"--only takes 'fast' or nothing; got {args.only!r}")
    fast_sizes = [int(n) for n in args.fast_calib.split(",")]
    news = data.load_texts("news", run.profile)
    documents = data.load_documents("evaluation", run.profile)  # the ten held-out articles, scored one by one
    per_doc = args.eval_tokens // len(documents)
    stamp = now()

    def measure(model, name, ratio, seconds, speed=False, **extra) -> dict:
        row = dict(method=name, ratio=ratio, params=models.count_parameters(model),
                   ppl=evaluation.perplexity(model, tokenizer, texts, max_tokens=args.eval_tokens),
                   news_ppl=evaluation.perplexity(model, tokenizer, news, max_tokens=args.eval_tokens),
                   lastword=evaluation.last_word_accuracy(model, tokenizer, items), prune_s=seconds,
                   measured=stamp, **extra)
        spread = evaluation.perplexity_spread(model, tokenizer, documents, tokens_per_document=per_doc)
        row |= dict(ppl10=spread.ppl, nll10=spread.nll, per_document10=spread.per_document, tokens10=spread.tokens)
        if speed:
            row["decode_tok_s"] = evaluation.latency(model, tokenizer, runs=3).decode_tok_s
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
               if k != "steps" and not isinstance(v, list)}, flush=True)
        return row

    stored = json.loads((RESULTS / "width.json").read_text()) if args.only else {}
    rows = [measure(base, "unpruned", 0.0, 0.0, speed=True)]
    allocations = dict(stored.get("allocations", {})) if stored else {}
    if args.only:
        rows += [r for r in stored["rows"] if r["method"] in EXACT_METHODS]
    else:
        rows += exact_rows(base, calibration, tokenizer, run.profile, measure, allocations)

    from optipfair import prune_model

    for samples in fast_sizes:  # the fast recipe, with the cost of each step
        fit = data.calibration_batches(tokenizer, data.load_texts("calibration", run.profile),
                                       n_samples=samples, seq_len=256, seed=0)
        steps = {}
        sequential = samples == fast_sizes[0]  # the default: sequential OBS, on the unpruned outputs recorded here
        start = time.perf_counter()
        with streams.recording_outputs(base) if sequential else contextlib.nullcontext() as reference:
            stats = importance.collect_stats(base, fit, gram=True)
        steps["statistics"] = time.perf_counter() - start
        start = time.perf_counter()
        residuals = surgery.residual_curves(base, stats)
        steps["residual curves"] = time.perf_counter() - start
        start = time.perf_counter()
        probe = data.calibration_batches(tokenizer, data.load_texts("calibration", run.profile), **FAST_PROBE)
        curves, _ = surgery.calibrated_curves(base, stats, probe, probe_ratio=FAST_PROBE_RATIO, smooth=FAST_SMOOTH,
                                              residuals=residuals)
        steps["probe"] = time.perf_counter() - start
        print(f"fast recipe, {samples} x 256 calibration:", {k: round(v, 1) for k, v in steps.items()}, flush=True)
        for ratio in RATIOS:
            allocation = surgery.allocate_from_curves(curves, ratio)
            allocations[f"{ratio} {samples}"] = list(allocation.values())
            for method in ("obs", "obs_sequential") if sequential else ("obs",):
                model = copy.deepcopy(base)
                start = time.perf_counter()
                if method == "obs":
                    surgery.prune_mlp(model, ratio, method="obs", stats=stats, allocation=allocation)
                else:
                    surgery.prune_mlp(model, ratio, method="obs_sequential", calibration=fit, allocation=allocation,
                                      reference=reference)
                select_s = time.perf_counter() - start
                rows.append(measure(model, fast_name(samples, method, fast_sizes[0]), ratio,
                                    select_s + sum(steps.values()), speed=method == "obs_sequential",
                                    steps={**steps, "selection + refit": select_s}, samples=samples))
    for ratio in RATIOS:
        model = copy.deepcopy(base)  # OptiPFair prunes in place: its own copy
        start = time.perf_counter()
        prune_model(model, pruning_type="MLP_GLU", neuron_selection_method="MAW", pruning_percentage=100 * ratio,
                    dataloader=calibration, show_progress=False)
        rows.append(measure(model, OPTIPFAIR, ratio, time.perf_counter() - start, speed=True))
    (RESULTS / "width.json").write_text(json.dumps(dict(rows=rows, allocations=allocations, measured=measured_line()),
                                                   indent=1))
    write_section(10, "width", "Width pruning (SmolLM2 MLP neurons)", render(rows, args, allocations))


def exact_rows(base, calibration, tokenizer, profile, measure, allocations) -> list[dict]:
    """Every importance method, and the exact recipe (damage curves measured at every grid ratio)."""
    rows = []
    start = time.perf_counter()
    stats = importance.collect_stats(base, calibration, gram=True)
    stats_s = time.perf_counter() - start
    start = time.perf_counter()
    probe = data.calibration_batches(tokenizer, data.load_texts("calibration", profile), **PROBE)
    curves = surgery.damage_curves(base, stats, probe)
    sensitivity_s = time.perf_counter() - start
    print(f"statistics {stats_s:.0f} s, damage curves {sensitivity_s:.0f} s", flush=True)
    for ratio in RATIOS:
        for name, scorer in importance.METHODS.items():
            model = copy.deepcopy(base)
            start = time.perf_counter()
            keep = surgery.select_neurons(importance.score_model(model, name, stats=stats), ratio)
            surgery.remove_mlp_neurons(model, keep)
            seconds = time.perf_counter() - start + (stats_s if scorer.needs_data else 0.0)
            rows.append(measure(model, name, ratio, seconds))
        allocation = surgery.allocate_from_curves(curves, ratio)
        allocations[f"{ratio} exact"] = list(allocation.values())
        model = copy.deepcopy(base)
        start = time.perf_counter()
        surgery.prune_mlp(model, ratio, method="obs", stats=stats, allocation=allocation)
        rows.append(measure(model, ONE_PASS, ratio, time.perf_counter() - start + stats_s + sensitivity_s))
        model = copy.deepcopy(base)
        start = time.perf_counter()
        surgery.prune_mlp(model, ratio, method="obs_sequential", calibration=calibration, allocation=allocation)
        rows.append(measure(model, COURSE, ratio, time.perf_counter() - start + stats_s + sensitivity_s, speed=True))
    return rows


def render(rows: list[dict], args, allocations: dict[str, list[float]]) -> str:
    """Markdown tables, the two targets (quality and time, in and out of domain) and the PPL-vs-ratio figure."""
    base = rows[0]

    def pick(method, ratio):
        return next((r for r in rows if r["method"] == method and r["ratio"] == ratio), None)

    def cell(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    default = fast_name(int(args.fast_calib.split(",")[0]), "obs_sequential", int(args.fast_calib.split(",")[0]))
    stamps = sorted({r["measured"] for r in rows})
    lines = [f"Budget: {args.eval_tokens:,} held-out tokens per PPL (Wikipedia evaluation articles; news: the same "
             f"number of tokens of the Lee news corpus, never used for calibration), {args.lastword_items} last-word "
             f"items; OptiPFair and the exact recipe calibrate on {args.calib_samples} paragraphs x 256 tokens "
             "from the calibration articles. Decode speed: batch 1, KV cache, median of 3 runs.", "",
             f"Two in-domain perplexities: **PPL** scores the first {args.eval_tokens:,} tokens of the held-out "
             "stream, which is mostly its first article (\"Azerbaijan\", 15,094 tokens); **PPL, ten articles** scores "
             f"the first {args.eval_tokens // 10:,} tokens of each of the ten held-out articles "
             "(`evaluation.perplexity_spread`, the protocol of the lessons and the other benchmarks; paired "
             "differences over the articles), measured for the rows run since 2026-12-05 (unpruned, fast recipes, "
             "OptiPFair). The in-domain targets are checked on the ten articles where both rows have them.", "",
             "Rows measured " + " and ".join(stamps) + ": the exact recipe and the importance methods "
             f"({pick(COURSE, RATIOS[0])['measured']}) are read from the stored results when the script runs with "
             "`--only fast`; the unpruned model, the fast recipes and OptiPFair always run together, so their "
             "times compare within one run.", "",
             "The fast recipe: Gram statistics on the calibration paragraphs, the closed-form refit residual of every "
             "layer at every grid ratio (`surgery.residual_curves`, one OBS run per layer, no forward pass), each "
             f"layer's curve scaled to one measured, refitted probe at {FAST_PROBE_RATIO:.0%} on "
             f"{FAST_PROBE['n_samples']} x {FAST_PROBE['seq_len']} tokens, each layer's scale the median over the "
             f"{FAST_SMOOTH} layers around it (`surgery.calibrated_curves`), the "
             "allocation minimising the summed curves, then OBS selection + refit, either in one pass over the "
             "statistics or sequentially on the pruned model's own activations; the default is sequential and reads "
             "the unpruned model's layer outputs recorded during its statistics pass (`streams.recording_outputs`), "
             "so only the pruned stream runs. The exact recipe measures the damage at all "
             f"{len(surgery.CURVE_GRID)} grid ratios on {PROBE['n_samples']} x {PROBE['seq_len']} tokens "
             "(`surgery.damage_curves`).", "",
             f"Unpruned: {base['params'] / 1e6:.1f} M params, PPL {base['ppl']:.2f}, PPL over the ten articles "
             f"{cell(base.get('ppl10'))}, news PPL {base['news_ppl']:.2f}, "
             f"last-word {base['lastword']:.3f}, decode {base['decode_tok_s']:.1f} tok/s.", ""]
    for ratio in RATIOS:
        lines += [f"**{ratio:.0%} of MLP neurons removed**", "",
                  "| method | params (M) | PPL | PPL increase | PPL, ten articles | news PPL | last-word acc "
                  "| prune time (s) | decode vs base |", "|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["ratio"] == ratio):
            speed = f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x" if "decode_tok_s" in row else "-"
            lines.append(f"| {row['method']} | {row['params'] / 1e6:.1f} | {row['ppl']:.2f} | "
                         f"+{row['ppl'] - base['ppl']:.2f} | {cell(row.get('ppl10'))} | {cell(row.get('news_ppl'))} | "
                         f"{row['lastword']:.3f} | "
                         f"{row['prune_s']:.1f} | {speed} |")
        lines.append("")
    def in_domain(ours, theirs):
        """(ratio of in-domain PPL increases to OptiPFair's, paired log-PPL difference +/- se or None): on the ten
        articles when both rows have them, else on the first tokens of the stream."""
        if "ppl10" in ours and "ppl10" in theirs and "ppl10" in base:
            diffs = [a - b for a, b in zip(ours["nll10"], theirs["nll10"], strict=True)]
            mean = sum(diffs) / len(diffs)
            se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
            return (ours["ppl10"] - base["ppl10"]) / (theirs["ppl10"] - base["ppl10"]), (mean, se)
        return (ours["ppl"] - base["ppl"]) / (theirs["ppl"] - base["ppl"]), None

    lines += ["**Targets: the default recipe's PPL increase at most half of OptiPFair's hybrid, in domain (ten "
              "articles) and on news, and its whole prune time at most 2x OptiPFair's (same run)**", "",
              "| ratio | default increase | OptiPFair increase | ratio | ten articles: ratio | paired log-PPL, "
              "default - OptiPFair | news: default | news: OptiPFair | ratio | default time (s) | OptiPFair time (s) "
              "| time ratio | exact recipe: ratio of increases | met |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in RATIOS:
        ours, theirs, exact = pick(default, ratio), pick(OPTIPFAIR, ratio), pick(COURSE, ratio)
        up = ours["ppl"] - base["ppl"], theirs["ppl"] - base["ppl"]
        ten, pair = in_domain(ours, theirs)
        news = ours["news_ppl"] - base["news_ppl"], theirs["news_ppl"] - base["news_ppl"]
        times = ours["prune_s"], theirs["prune_s"]
        met = ten <= 0.5 and news[0] <= news[1] / 2 and times[0] <= 2 * times[1]
        lines.append(f"| {ratio:.0%} | +{up[0]:.2f} | +{up[1]:.2f} | {up[0] / up[1]:.3f} | {ten:.3f} | "
                     + ("-" if pair is None else f"{pair[0]:+.3f} +/- {pair[1]:.3f}") + " | "
                     f"+{news[0]:.2f} | +{news[1]:.2f} | {news[0] / news[1]:.3f} | {times[0]:.0f} | {times[1]:.0f} | "
                     f"{times[0] / times[1]:.2f} | {(exact['ppl'] - base['ppl']) / up[1]:.2f} | "
                     f"{'yes' if met else 'no'} |")
    lines += ["", "**Every fast recipe against the same targets** (ratios of PPL increases to OptiPFair's at 10 / 20 / "
              "40 %; time: whole prune time / OptiPFair's)", "",
              "| recipe | in domain (stream) | in domain (ten articles) | news | time | all met |",
              "|---|---|---|---|---|---|"]
    worst = {}
    for name in dict.fromkeys(r["method"] for r in rows if "steps" in r):
        ins, tens, outs, clock = [], [], [], []
        for ratio in RATIOS:
            ours, theirs = pick(name, ratio), pick(OPTIPFAIR, ratio)
            ins.append((ours["ppl"] - base["ppl"]) / (theirs["ppl"] - base["ppl"]))
            tens.append(in_domain(ours, theirs)[0])
            outs.append((ours["news_ppl"] - base["news_ppl"]) / (theirs["news_ppl"] - base["news_ppl"]))
            clock.append(ours["prune_s"] / theirs["prune_s"])
        met = max(tens) <= 0.5 and max(outs) <= 0.5 and max(clock) <= 2
        lines.append(f"| {name} | {' / '.join(f'{v:.3f}' for v in ins)} | {' / '.join(f'{v:.3f}' for v in tens)} | "
                     f"{' / '.join(f'{v:.3f}' for v in outs)} | "
                     f"{' / '.join(f'{v:.2f}' for v in clock)} | {'yes' if met else 'no'} |")
        worst[name] = (max(tens), max(outs), met)
    passing = [n for n, (_, _, ok) in worst.items() if ok]
    worst_in = max(w[0] for n, w in worst.items() if "one pass" in n)
    lines += ["", f"On the ten articles every one-pass recipe keeps at most {worst_in:.3f} of OptiPFair's increase; "
              f"on news each recipe's worst ratio lies between {min(w[1] for w in worst.values()):.3f} and "
              f"{max(w[1] for w in worst.values()):.3f}; {len(passing)} of the {len(worst)} fast recipes "
              f"{'meets' if len(passing) == 1 else 'meet'} every target in this run. The default's calibration "
              "size (128) was chosen after the run of 2026-12-05 01:08 UTC, from its stream and news columns "
              "(held-out text). Its sequential selection was chosen on "
              "validation text only: " + validation_sentence()]
    lines += ["", "**What each step of the fast recipe costs** (seconds, this run; selection + refit averaged over "
              "the three ratios)", "",
              "| recipe | statistics | residual curves | probe | selection + refit | total at 20 % |",
              "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["method"] for r in rows if "steps" in r):
        chosen = [r for r in rows if r["method"] == name]
        steps = chosen[0]["steps"]
        select = sum(r["steps"]["selection + refit"] for r in chosen) / len(chosen)
        lines.append(f"| {name} | {steps['statistics']:.0f} | {steps['residual curves']:.0f} | {steps['probe']:.0f} "
                     f"| {select:.0f} | {pick(name, 0.2)['prune_s']:.0f} |")
    lines += ["", "How they scale (L layers, width d of the MLP, N calibration tokens, P probe tokens): "
              "the statistics are one forward pass over N tokens plus an N x d x d Gram update per layer; the "
              "residual curves are one OBS elimination per layer (L d^3 / chunk, independent of N); the probe runs "
              "the layers from l on for every layer l (about L^2 / 2 layer passes over P tokens); one-pass selection "
              "+ refit is again L OBS eliminations and L d x d solves (independent of N); the sequential one runs "
              "the pruned model's stream through every layer (one more pass over N tokens; a second one, for the "
              "unpruned stream, unless its outputs were recorded during the statistics pass, which holds L x N x "
              "hidden floats: 2.3 GB here) and a (d + 1) x (d + 1) Gram per pruned layer. The exact recipe's damage "
              "curves are the probe times the "
              f"{len(surgery.CURVE_GRID)} grid ratios on a 16 x 256 probe.", "",
              "Allocation: per-layer ratios in % of each layer's neurons, layers 0-29:", ""]
    for key, values in allocations.items():
        ratio, source = key.split()
        source = "measured curves" if source == "exact" else f"calibrated curves, {source} x 256 calibration"
        lines.append(f"- {float(ratio):.0%}, {source}: " + " ".join(f"{100 * r:.0f}" for r in values))
    lines += ["", "![PPL vs ratio](width_ppl_vs_ratio.png)"]
    figure(rows, highlight=(COURSE, OPTIPFAIR, default))
    return "\n".join(lines)


VALIDATION = RESULTS / "logs" / "width_ood_probe_2026-12-05"


def validation_sentence() -> str:
    """One-pass against sequential on the validation probe's text, rendered from its stored outputs."""
    first, fourth = (json.loads((VALIDATION / name).read_text()) for name in ("output.json", "output4.json"))
    base = first["base"]

    def ratios(method, domain):
        return [(fourth["rows"][f"fast 128 {method} {r}"][domain] - base[domain])
                / (first["rows"][f"optipfair {r}"][domain] - base[domain]) for r in RATIOS]

    def text(values):
        return " / ".join(f"{v:.3f}" for v in values)

    posts = ratios("obs_sequential", 1) + ratios("obs", 1)
    tuned = [(row[1] - base[1]) / (first["rows"][f"optipfair {key.split()[-1]}"][1] - base[1])
             for key, row in first["rows"].items() if key.startswith("fast ")]
    verdict = ("both variants stay above half of OptiPFair's increase there" if min(posts) > 0.5 else
               "the target of half is met there only at some ratios" if max(posts) > 0.5 else
               "both stay within half of OptiPFair's increase there too")
    return (f"on 12 calibration-split articles the sequential recipe kept {text(ratios('obs_sequential', 0))} of "
            f"OptiPFair's PPL increase at 10 / 20 / 40 % against {text(ratios('obs', 0))} for one pass, and on 24 "
            f"Usenet posts (gensim's test data, a second out-of-domain text) {text(ratios('obs_sequential', 1))} "
            f"against {text(ratios('obs', 1))}: {verdict}. No one-pass variant of probe 1 (refit ridge 0.1-3, "
            f"calibration 64-256 paragraphs) kept less than {min(tuned):.3f} there "
            "(`results/logs/width_ood_probe_2026-12-05/NOTES.md`, probes 1 and 4).")


def method_colours(methods: list[str], highlight: tuple[str, ...]) -> dict:
    """A distinct colour per method: the highlighted ones get the strongest hues, the rest follow tab20's dark
    shades, then black, then its light ones (the first eleven methods never share a hue)."""
    cmap = plt.get_cmap("tab20")
    order = [cmap(i) for i in (6, 0, 4, 2, 8, 10, 12, 14, 16, 18)] + ["black"]
    order += [cmap(i) for i in (17, 15, 13, 11, 9, 7, 5, 3, 1, 19)]
    ranked = [m for m in highlight if m in methods] + [m for m in methods if m not in highlight]
    return {m: order[i % len(order)] for i, m in enumerate(ranked)}


def figure(rows: list[dict], highlight: tuple[str, ...]) -> None:
    """Two panels: every method on a log axis (the overview), and the methods that stay near the base on a linear
    axis of PPL increase (the comparison that matters). One colour per method, the legend below the data."""
    base = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    colours = method_colours(methods, highlight)
    worst = {m: max(r["ppl"] for r in rows if r["method"] == m) for m in methods}
    near = [m for m in methods if worst[m] < 4 * base["ppl"]]  # within 4x the base PPL at every ratio
    fig, (overview, zoom) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(wspace=0.3))
    for method in methods:
        points = sorted((r["ratio"], r["ppl"]) for r in rows if r["method"] == method)
        style = dict(marker="o", color=colours[method], lw=2.5 if method in highlight else 1, label=method)
        overview.plot(*zip(*points, strict=True), **style)
        if method in near:
            zoom.plot([x for x, _ in points], [y / base["ppl"] - 1 for _, y in points], **style)
    overview.axhline(base["ppl"], color="black", ls="--", lw=1)
    overview.set_yscale("log")
    overview.set_ylabel("held-out PPL (log; dashed: unpruned)")
    overview.set_title("every method")
    zoom.set_ylabel("PPL increase over the unpruned model")
    zoom.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    zoom.set_title(f"the {len(near)} methods within 4x the base PPL")
    for ax in (overview, zoom):
        ax.set_xlabel("fraction of MLP neurons removed")
    save_figure(fig, overview, "SmolLM2-135M width pruning", len(methods), "width_ppl_vs_ratio.png", top=0.86)


def save_figure(fig, legend_from, title: str, n_methods: int, name: str, top: float) -> None:
    """The report figures' common finish: one legend below the panels (three columns), the title, saved in results/."""
    handles, labels = legend_from.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.subplots_adjust(bottom=0.13 + 0.042 * ((n_methods + 2) // 3), top=top)
    fig.savefig(RESULTS / name, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--replot"]:  # redraw the figure from results/width.json (no model, no measurement)
        stored = json.loads((RESULTS / "width.json").read_text())
        default = fast_name(int(FAST_CALIB.split(",")[0]), "obs", int(FAST_CALIB.split(",")[0]))
        figure(stored["rows"], highlight=(COURSE, OPTIPFAIR, default))
    elif sys.argv[1:] == ["--render"]:  # the section from results/width.json; FAST_CALIB's first size is the default
        stored = json.loads((RESULTS / "width.json").read_text())
        default_samples = int(FAST_CALIB.split(",")[0])
        for row in stored["rows"]:  # the fast rows' labels follow the default calibration size
            if "samples" in row:
                kind = "obs" if "one pass" in row["method"] else "obs_sequential"
                row["method"] = fast_name(row["samples"], kind, default_samples)
        (RESULTS / "width.json").write_text(json.dumps(stored, indent=1))  # the labels as rendered
        args = argparse.Namespace(eval_tokens=16384, lastword_items=100, calib_samples=256, fast_calib=FAST_CALIB)
        write_section(10, "width", "Width pruning (SmolLM2 MLP neurons)",
                      render(stored["rows"], args, stored["allocations"]), measured=stored.get("measured"))
    else:
        main()
