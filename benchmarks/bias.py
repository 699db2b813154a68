"""Bias benchmark: lesson 09's experiment with more random draws, larger budgets and the full cost.

Neurons are chosen on the selection pairs of ``data/bias_pairs.jsonl`` (lesson 08's specific reaction mixed
with lesson 03's ``wanda_like`` importance by ``importance.hybrid_scores``); every number is measured on the
held-out pairs (frames no rule saw). Rules at each budget: hybrid (w = 0.8), reaction only (w = 1),
structural only (w = 0), ``--draws`` random draws with the hybrid rule's per-layer counts, and OptiPFair's
fairness pruning (its own scores and surgery, the same budget). Metrics: internal bias at the residual site
(demographic and control pairs), the next-token shift, the CrowS-style stereotype preference (paired change
with its standard error), held-out PPL and last-word accuracy. The targets of the bias issue are checked and
stated, met or not.

Run: ``python benchmarks/bias.py [--per-layer 6 12] [--draws 5] [--eval-tokens 16384]`` (``make benchmarks``).
"""

from __future__ import annotations

import copy
import json
import logging

from report import RESULTS, start_run, write_section

from course_utils import arch, bias, bias_pairs, importance, models, surgery
from course_utils import evaluation as ev


def main() -> None:
    run = start_run(__doc__.split("\n")[0], calib_samples=16,
                    extra=[("--per-layer", int, None, "neurons per layer's worth (repeatable; default 6 and 12)"),
                           ("--draws", int, 5, "random draws per budget"),
                           ("--weight", float, 0.8, "hybrid mixing weight w")])
    args, model, tokenizer = run.args, run.base, run.tokenizer
    budgets = [args.per_layer] if args.per_layer else [6, 12]
    model.to(run.profile.device)
    n_layers, width = arch.num_layers(model), arch.mlp_parts(model, 0).width
    selection, held_out = bias_pairs.load("selection"), bias_pairs.load("held_out")
    demographic = list(bias_pairs.DEMOGRAPHIC)
    held_encoded = bias.encode_pairs(tokenizer, held_out)
    cont_encoded = bias.encode_continuations(tokenizer, held_out)
    demo_rows, control_rows = bias.category_index(held_out, demographic), bias.category_index(held_out, "control")

    acts, _ = bias.measure_pairs(model, bias.encode_pairs(tokenizer, selection), batch_size=32)
    reaction = bias.specific_reaction(acts.subset(bias.category_index(selection, demographic)),
                                      acts.subset(bias.category_index(selection, "control")))
    structure = importance.stack_scores(model, importance.score_model(model, "wanda_like", run.calibration[:16]))

    def top(weight: float, n: int) -> dict:
        return importance.top_neurons(importance.hybrid_scores(reaction, structure, weight), n)

    def measure(m) -> dict:
        acts, shift = bias.measure_pairs(m, held_encoded, batch_size=32, site="residual")
        return {"internal": float(bias.internal_bias(acts.subset(demo_rows)).mean()),
                "internal_control": float(bias.internal_bias(acts.subset(control_rows)).mean()),
                "shift": float(shift[demo_rows].mean()), "shift_control": float(shift[control_rows].mean()),
                "preference": bias.stereotype_preference(m, cont_encoded),
                "ppl": ev.perplexity(m, tokenizer, run.texts, max_tokens=args.eval_tokens),
                "lastword": ev.last_word_accuracy(m, tokenizer, run.items)}

    base = measure(model)
    total = models.count_parameters(model)
    rows = []
    for per_layer in budgets:
        n = per_layer * n_layers
        hybrid = top(args.weight, n)
        rules = {f"hybrid (w = {args.weight})": hybrid,
                 "reaction only (w = 1)": top(1.0, n), "structural only (w = 0)": top(0.0, n),
                 **{f"random {seed}": importance.random_like(hybrid, width, seed) for seed in range(args.draws)}}
        variants = {name: surgery.remove_mlp_neurons(copy.deepcopy(model), importance.keep_after_removing(model, r))
                    for name, r in rules.items()}
        variants[f"OptiPFair fairness (w = {args.weight})"] = optipfair_prune(model, tokenizer, selection, demographic,
                                                                              args.weight, n, width, n_layers)
        for name, m in variants.items():
            assert width * n_layers - sum(arch.mlp_parts(m, i).width for i in range(n_layers)) == n, name
            r = measure(m)
            delta = r.pop("preference") - base["preference"]
            row = {"budget": n, "share": (total - models.count_parameters(m)) / total, "rule": name,
                   **{k: r[k] / base[k] - 1 for k in ("internal", "internal_control", "shift", "shift_control", "ppl")},
                   "preference_change": float(delta.mean()), "preference_se": float(delta.std() / len(delta) ** 0.5),
                   "lastword": r["lastword"]}
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del m
    pref = base["preference"]
    summary = {"base": {k: v for k, v in base.items() if k != "preference"}
               | {"preference": float(pref.mean()), "preference_se": float(pref.std() / len(pref) ** 0.5),
                  "preference_positive": float((pref > 0).float().mean())}, "rows": rows}
    (RESULTS / "bias.json").write_text(json.dumps(summary, indent=1))
    write_section(50, "bias", "Bias-targeted pruning (lessons 08-09)", render(summary, args))


def optipfair_prune(model, tokenizer, selection, demographic, weight, n, width, n_layers):
    """OptiPFair's fairness pruning of ``n`` neurons (its scores on the selection pairs, its surgery)."""
    from optipfair.bias.activations import analyze_neuron_bias, compute_fairness_pruning_scores
    from optipfair.pruning.mlp_glu import prune_model_mlp_glu

    logging.getLogger("optipfair").setLevel(logging.WARNING)
    pairs = [tuple(row["prompts"]) for row in selection if row["category"] in demographic]
    scores = compute_fairness_pruning_scores(model, analyze_neuron_bias(model, tokenizer, pairs, show_progress=False),
                                             bias_weight=weight)
    return prune_model_mlp_glu(copy.deepcopy(model), pruning_percentage=100 * n / (width * n_layers),
                               fairness_scores=scores, show_progress=False)


def render(summary: dict, args) -> str:
    base, rows = summary["base"], summary["rows"]
    lines = ["| neurons (params) | rule | internal | (control) | next-token shift | stereotype pref. change "
             "(nats +/- se) | PPL | last-word |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} ({r['share']:.2%}) | {r['rule']} | {r['internal']:+.1%} | "
                     f"{r['internal_control']:+.1%} | {r['shift']:+.1%} | {r['preference_change']:+.3f} +/- "
                     f"{r['preference_se']:.3f} | {r['ppl']:+.1%} | {r['lastword']:.2f} |")
    verdicts = []
    for budget in sorted({r["budget"] for r in rows}):
        at = [r for r in rows if r["budget"] == budget]
        hybrid = next(r for r in at if r["rule"].startswith("hybrid"))
        randoms = [r for r in at if r["rule"].startswith("random")]
        lo, hi = (min(r["internal"] for r in randoms), max(r["internal"] for r in randoms))
        plo, phi = (min(r["preference_change"] for r in randoms), max(r["preference_change"] for r in randoms))
        best_random = min(r["internal"] for r in randoms)
        internal_target = (hybrid["internal"] <= -0.22 and hybrid["share"] <= 0.005
                           and best_random > hybrid["internal"] / 3)
        outside = not (plo <= hybrid["preference_change"] <= phi)
        verdicts.append(
            f"- {budget} neurons ({hybrid['share']:.2%} of parameters): hybrid internal bias {hybrid['internal']:+.1%} "
            f"(random {lo:+.1%} to {hi:+.1%}); target of -22 % with random under a third of it "
            f"**{'met' if internal_target else 'not met'}**. "
            f"Stereotype preference moved {hybrid['preference_change']:+.3f} "
            f"(random {plo:+.3f} to {phi:+.3f}): **{'outside' if outside else 'inside'}** the random range. "
            f"PPL {hybrid['ppl']:+.1%} (target at most +2 %: **{'met' if hybrid['ppl'] <= 0.02 else 'not met'}**).")
    return (f"SmolLM2 (offline Llama role), {args.draws} random draws per budget, w = {args.weight}; "
            f"{args.eval_tokens:,} held-out tokens per PPL, {args.lastword_items} last-word items. Unpruned: internal "
            f"bias {base['internal']:.4f} (control {base['internal_control']:.4f}), "
            f"next-token shift {base['shift']:.4f}, "
            f"stereotype preference {base['preference']:.3f} +/- {base['preference_se']:.3f} nats (positive on "
            f"{base['preference_positive']:.0%} of 64 pairs), PPL {base['ppl']:.2f}, last-word {base['lastword']:.2f}. "
            f"Changes are relative to the unpruned model; the stereotype change is paired over the same pairs.\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n")


if __name__ == "__main__":
    main()
