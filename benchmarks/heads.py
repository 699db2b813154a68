"""Head-pruning benchmark: K/V groups against MLP neurons and whole layers at the same parameters (lesson 10).

For SmolLM2 (offline Llama role), at one and two decoder layers' worth of parameters (12 and 24 of the 90 K/V
groups): whole K/V groups chosen by the first-order Taylor score (``importance.head_scores``), the same number
of random groups (``--draws`` draws), as many MLP neurons chosen by ``wanda_like`` model-wide, and whole layers
chosen by block influence. Rows: params removed, held-out PPL (the first ``--eval-tokens`` / 10 tokens of each of
the ten held-out articles, ``evaluation.perplexity_spread``, so every comparison is read against the spread over
articles), last-word accuracy, KV-cache numbers per token,
FLOPs of a forward pass at 128 and 1,024 tokens (counted by ``FlopCounterMode`` with eager attention, which it
sees; on a CPU it misses the fused SDPA kernel), and the clock: prefill of a 1,024-token prompt and KV-cache decode
speed after it, as ratios to the unpruned model measured in the same run.

Run: ``python benchmarks/heads.py [--draws 5] [--eval-tokens 16384]`` (``make benchmarks``);
``python benchmarks/heads.py --render`` rewrites the report section from ``results/heads.json`` without measuring.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys

from report import RESULTS, measured_line, start_run, write_section

from course_utils import arch, data, evaluation, heads, importance, models, surgery


def main() -> None:
    if sys.argv[1:] == ["--render"]:
        stored = json.loads((RESULTS / "heads.json").read_text())
        write_section(52, "heads", "Attention heads on a GQA model (lesson 10)", render(stored["rows"], stored["args"]),
                      measured=stored["measured"])
        return
    run = start_run(__doc__.split("\n")[0], calib_samples=8,
                    extra=[("--draws", int, 5, "random K/V-group draws per budget"),
                           ("--prompt-tokens", int, 1024, "prompt length for the clock")])
    args, model, tokenizer = run.args, run.base, run.tokenizer
    model.to(run.profile.device)
    calibration = [{k: v[:, :128] for k, v in batch.items()} for batch in run.calibration]
    taylor = importance.head_scores(model, "taylor", calibration, per="group")
    wanda = importance.stack_scores(model, importance.score_model(model, "wanda_like", calibration))
    influence = importance.block_influence(model, calibration)
    parts = arch.attention_parts(model, 0)
    group_params = (2 * parts.group_size + 2) * parts.head_dim * model.config.hidden_size  # q, o of its heads; k, v
    base_params = models.count_parameters(model)
    documents = data.load_documents("evaluation", run.profile)
    per_doc = max(64, args.eval_tokens // len(documents))

    def width(n_neurons: int):  # the least important neurons model-wide
        removed = importance.top_neurons(-wanda, n_neurons)
        return surgery.remove_mlp_neurons(copy.deepcopy(model), importance.keep_after_removing(model, removed))

    def measure(name: str, m, base: dict | None = None) -> dict:
        speed = evaluation.latency(m, prompt_tokens=args.prompt_tokens, new_tokens=32, runs=5)
        spread = evaluation.perplexity_spread(m, tokenizer, documents, tokens_per_document=per_doc)
        row = {"variant": name, "removed": base_params - models.count_parameters(m),
               "ppl": spread.ppl, "nll": spread.nll, "per_document": spread.per_document,
               "lastword": evaluation.last_word_accuracy(m, tokenizer, run.items),
               "kv": heads.kv_cache_values_per_token(m), "flops_128": evaluation.forward_flops(m, 128),
               "flops_1024": evaluation.forward_flops(m, 1024),
               "prefill_ms": speed.prefill_ms, "decode_tok_s": speed.decode_tok_s}
        if base is not None:
            row |= {"prefill_x": base["prefill_ms"] / row["prefill_ms"],
                    "decode_x": row["decode_tok_s"] / base["decode_tok_s"]}
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
               if k not in ("nll", "per_document")}, flush=True)
        return row

    base = measure("unpruned", model)
    rows = [base]
    for layers, n in ((1, 12), (2, 24)):
        variants = {f"{n} K/V groups (Taylor)": heads.remove_heads(
                        copy.deepcopy(model), heads.group_heads(model, importance.lowest_groups(model, taylor, n))),
                    f"{n * group_params // (3 * model.config.hidden_size):,} MLP neurons (wanda_like)":
                        width(n * group_params // (3 * model.config.hidden_size)),
                    f"{layers} layer(s) (block influence)": surgery.drop_layers(copy.deepcopy(model),
                                                                                influence.argsort()[:layers].tolist())}
        for seed in range(args.draws):
            variants[f"{n} random K/V groups, draw {seed}"] = heads.remove_heads(
                copy.deepcopy(model), heads.group_heads(model, importance.random_groups(model, n, seed)))
        for name, m in variants.items():
            rows.append(measure(name, m, base) | {"budget_layers": layers})
            del m
    stored = {"args": {k: getattr(args, k) for k in ("eval_tokens", "lastword_items", "prompt_tokens", "draws")},
              "measured": measured_line(), "rows": rows}
    (RESULTS / "heads.json").write_text(json.dumps(stored, indent=1))
    write_section(52, "heads", "Attention heads on a GQA model (lesson 10)", render(rows, stored["args"]),
                  measured=stored["measured"])


def render(rows: list[dict], args: dict) -> str:
    base = rows[0]
    lines = ["| variant | params removed (M) | PPL | last-word | KV / token | FLOPs 128 | FLOPs 1,024 | prefill x | "
             "decode x |", "|---|---|---|---|---|---|---|---|---|",
             f"| unpruned | 0 | {base['ppl']:.2f} | {base['lastword']:.2f} | {base['kv']:,} | "
             f"{base['flops_128'] / 1e9:.1f} G | {base['flops_1024'] / 1e9:.1f} G | 1.00 | 1.00 |"]
    for r in rows[1:]:
        lines.append(f"| {r['variant']} | {r['removed'] / 1e6:.2f} | {r['ppl']:.2f} | {r['lastword']:.2f} | "
                     f"{r['kv'] / base['kv']:.0%} | {r['flops_128'] / base['flops_128']:.1%} | "
                     f"{r['flops_1024'] / base['flops_1024']:.1%} | {r['prefill_x']:.2f} | {r['decode_x']:.2f} |")
    verdicts = []
    for layers in (1, 2):
        at = [r for r in rows[1:] if r["budget_layers"] == layers]
        taylor = next(r for r in at if "Taylor" in r["variant"])
        randoms = sorted(r["ppl"] for r in at if "random" in r["variant"])
        line = (f"- {layers} layer(s)' worth: Taylor groups PPL {taylor['ppl']:.2f}, {len(randoms)} random draws "
                f"{randoms[0]:.2f} to {randoms[-1]:.2f} (median {randoms[len(randoms) // 2]:.2f})")
        for other in (r for r in at if "MLP" in r["variant"] or "layer" in r["variant"]):
            diff, se = paired(taylor, other)
            verdict = "beyond" if abs(diff) > 2 * se else "within"
            line += (f"; against {other['variant']} (PPL {other['ppl']:.2f}): log-PPL {diff:+.3f} +/- {se:.3f}, "
                     f"{verdict} twice the paired spread")
        verdicts.append(line + ".")
    same = [r for r in rows[1:] if "random" in r["variant"]]  # identical shapes and FLOPs: their clocks differ by noise
    prefill, decode = sorted(r["prefill_x"] for r in same), sorted(r["decode_x"] for r in same)
    noise = (f"The random draws have identical shapes and FLOPs, so the spread of their clock ratios is the clock's "
             f"noise in this run: prefill {prefill[0]:.2f}-{prefill[-1]:.2f}x, "
             f"decode {decode[0]:.2f}-{decode[-1]:.2f}x. A clock "
             "difference inside that band says nothing; the FLOP and KV-cache columns are exact.")
    verdicts.append("\n" + noise)
    return (f"SmolLM2, held-out PPL over the first {args['eval_tokens'] // 10:,} tokens of each of the 10 held-out "
            f"articles (paired differences: Taylor minus the other, mean log-PPL over articles +/- its standard "
            f"error), {args['lastword_items']} last-word items, "
            f"clock: a {args['prompt_tokens']:,}-token prompt then 32 decoded tokens with the KV cache, median of 5 "
            "runs after a warm-up, as ratios to the unpruned model in the same run (above 1 = faster). FLOPs counted "
            "with eager attention.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n")


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean log-PPL difference a - b over the same articles, with its paired standard error."""
    diffs = [x - y for x, y in zip(a["nll"], b["nll"], strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


if __name__ == "__main__":
    main()
