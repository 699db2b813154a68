"""Adaptive attention bypass on more held-out text than lesson 06 can afford: what the router buys (lesson 06).

The course's shipped router calibration (``data/adaptive_bypass_smollm2.json``: 1,130 calibration prompts, loss on
the continuation, halves on disjoint paragraphs) is judged on every long held-out paragraph cut at every prompt
length (the Wikipedia evaluation articles, and the Lee news corpus as text from another domain). For each prompt the
loss on its next 32 tokens is measured at every skip count of the grid (one batched pass per count), so every
router plan and every static bypass is read off one table. At each tolerance where the calibration parts the bands,
the routed plan is compared with a static bypass that skips as many sub-layers on average (two neighbouring counts
mixed over the same prompts), paired prompt by prompt; the standard error is over paragraphs (a paragraph's five
prompts share text, so they are averaged first).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from report import RESULTS, measured_line, write_section

import course_utils
from course_utils import bypass, data, likelihood, models

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "adaptive_bypass_smollm2.json"
TOKENS = 32


def measure(model, tokenizer, cal, paragraphs) -> dict:
    """Per-prompt continuation loss at every skip count, features' band, and the paragraph each prompt came from."""
    pairs = data.cut_every_length(paragraphs)
    router = bypass.AdaptiveBypass(model, cal)
    items, bands = [], []
    for prompt, rest in pairs:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        items.append((ids.tolist(), tokenizer(rest, add_special_tokens=False)["input_ids"][:TOKENS]))
        bands.append(router.band(bypass.prompt_features(model, ids)))
    grid = [int(k) for k in cal.measured["0"]]
    loss = {}
    for k in grid:
        with bypass.skipping(model, cal.order[:k]):
            logprob = likelihood.continuation_logprob(model, items, batch_size=16)
        loss[k] = [round((-lp / len(c)).item(), 5) for lp, (_, c) in zip(logprob, items, strict=True)]
    return dict(grid=grid, bands=bands, paragraph=[i // len(data.PROMPT_LENGTHS) for i in range(len(pairs))],
                loss={str(k): v for k, v in loss.items()})


def compare(table: dict, plan: list[int]) -> dict:
    """Routed plan vs a static bypass of the same average skips, paired, s.e. over paragraphs."""
    grid, bands, par = table["grid"], table["bands"], table["paragraph"]
    loss = {int(k): v for k, v in table["loss"].items()}

    def increase(i, k):  # k may fall between grid points: mix the two neighbours
        lo, hi = max(g for g in grid if g <= k), min(g for g in grid if g >= k)
        w = 0.0 if hi == lo else (k - lo) / (hi - lo)
        return (1 - w) * (loss[lo][i] - loss[0][i]) + w * (loss[hi][i] - loss[0][i])

    n = len(bands)
    skipped = statistics.fmean(plan[b] for b in bands)
    diffs = [increase(i, plan[bands[i]]) - increase(i, skipped) for i in range(n)]
    per_par = [statistics.fmean(d for d, p in zip(diffs, par, strict=True) if p == j) for j in sorted(set(par))]
    return dict(plan=plan, skipped=skipped, routed=statistics.fmean(increase(i, plan[bands[i]]) for i in range(n)),
                diff=statistics.fmean(diffs), se=statistics.stdev(per_par) / math.sqrt(len(per_par)))


def render(stored: dict) -> str:
    cal = bypass.RouterCalibration.load(SHIPPED)
    lines = [
        f"Shipped calibration: {sum(cal.prompts_per_band)} prompts ({cal.prompts_per_band} per band), loss on the "
        f"next {TOKENS} tokens, tolerance {cal.tolerance} nats/token -> skip per band {cal.skip_per_band}. Held-out "
        "prompts: every long paragraph (>= 170 words) cut after 8, 16, 32, 64 and 128 words. Loss increase in "
        "nats/token on the next 32 tokens; 'routed - static' is paired prompt by prompt against a static bypass "
        "that skips as many sub-layers on average, with its standard error over paragraphs.", ""]
    for name, table in stored["tables"].items():
        bands, grid = table["bands"], table["grid"]
        loss = {int(k): v for k, v in table["loss"].items()}
        lines += [f"**{name}** ({len(bands)} prompts from {len(set(table['paragraph']))} paragraphs; per band "
                  f"{[bands.count(b) for b in range(3)]})", "",
                  "| band | " + " | ".join(f"{k} skipped" for k in grid[1:]) + " |",
                  "|---|" + "---|" * (len(grid) - 1)]
        for b in range(3):
            rows = [i for i, x in enumerate(bands) if x == b]
            lines.append(f"| {b} | " + " | ".join(f"{statistics.fmean(loss[k][i] - loss[0][i] for i in rows):+.3f}"
                                                   for k in grid[1:]) + " |")
        lines += ["", "| tolerance | skip per band | skipped on average | routed | routed - static (s.e.) |",
                  "|---|---|---|---|---|"]
        for t, c in stored["compare"][name].items():
            lines.append(f"| {float(t):.2f} | {c['plan']} | {c['skipped']:.2f} | {c['routed']:+.3f} | "
                         f"{c['diff']:+.4f} ({c['se']:.4f}) |")
        lines.append("")
    at_shipped = {n: next(c for c in rows.values() if c["plan"] == cal.skip_per_band)
                  for n, rows in stored["compare"].items()}
    lines.append(f"At the shipped plan {cal.skip_per_band}, routed minus static: " + "; ".join(
        f"{n} {c['diff']:+.4f} (s.e. {c['se']:.4f}), {c['diff'] / c['routed']:+.1%} of the routed loss increase"
        for n, c in at_shipped.items()) + ".")
    beyond = [(n, t) for n, rows in stored["compare"].items() for t, c in rows.items() if abs(c["diff"]) > 2 * c["se"]]
    lines.append("Routed minus static beyond two standard errors: " +
                 (", ".join(f"{n} at {float(t):.2f}" for n, t in beyond) if beyond else "none") +
                 f". Measured in {stored['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] != ["--render"]:
        profile = course_utils.setup("offline", verbose=False)
        model, tokenizer = models.load_model("llama", profile)
        cal = bypass.RouterCalibration.load(SHIPPED)
        start = time.time()
        tables = {}
        for name, split in (("Wikipedia, held-out articles", "evaluation"), ("Lee news (another domain)", "news")):
            paragraphs = [p for p in data.load_texts(split, profile) if len(p.split()) >= 170]
            tables[name] = measure(model, tokenizer, cal, paragraphs)
            print(name, len(paragraphs), "paragraphs", f"{time.time() - start:.0f} s", flush=True)
        parted = {}
        for t in range(1, 100):
            plan = bypass.skips_for(cal.measured, t / 100)
            if len(set(plan)) > 1 and plan not in parted.values():
                parted[t / 100] = plan
        stored = dict(measured=measured_line(), seconds=time.time() - start, tables=tables,
                      compare={n: {str(t): compare(tab, p) for t, p in parted.items()} for n, tab in tables.items()})
        (RESULTS / "router.json").write_text(json.dumps(stored) + "\n")
    stored = json.loads((RESULTS / "router.json").read_text())
    write_section(25, "router", "Adaptive attention bypass on held-out prompts (lesson 06)", render(stored),
                  measured=stored["measured"])
    print(render(stored))


if __name__ == "__main__":
    main()
