"""Torch-Pruning's GQA head pruning against the course's own head removal, at equal parameters (lesson 10).

SmolLM2 (offline Llama role: 30 layers, 9 query / 3 K/V heads, head_dim 64). Torch-Pruning (PyPI
``torch-pruning``) prunes attention heads uniformly (the same in every layer, local ranking) in two set-ups, each
measured against the course's ``heads.remove_heads`` removing the same structure at equal parameters:

- ``gqa``: Torch-Pruning's own GQA set-up, as in its ``examples/LLMs/prune_llm.py``: ``MetaPruner`` with
  ``num_heads`` (9 for q_proj, 3 for k/v), ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``head_pruning_ratio=1/3``, MLPs / embedding / lm_head ignored. It removes one query head from every K/V group
  (3 of 9 per layer, 90 in all) and keeps every K/V head (under GQA its pruner clears the K/V indices). Course
  rows: the lowest-Taylor query head of each group (``importance.head_scores``) and the same pattern drawn at
  random (3 seeds).
- ``groups``: one whole K/V group (its K/V head and its 3 query heads) per layer, 30 groups. ``MetaPruner``
  cannot do this: declaring each group as one 192-wide head (``num_heads`` 3 for q, k and v) makes it prune
  nothing, silently (the index map through ``repeat_kv`` hands k/v each index 3 times, so
  ``check_pruning_group`` sees 192 of 192 rows removed and skips the group; pruned by hand, the same duplicates
  make ``LinearPruner`` set ``out_features`` to 0 while the weight keeps 128 rows, so they are deduplicated). So
  this set-up uses Torch-Pruning's ``DependencyGraph`` directly: per layer, the group rooted at o_proj's input
  channels, scored by the same importance, averaged over each 192-channel K/V group; the lowest group is pruned
  (q/k/v rows and o columns follow through the graph). Course rows: the lowest-Taylor group of each layer
  (``importance.head_scores(..., per="group")``) and random groups (3 seeds).

Torch-Pruning importance: ``GroupMagnitudeImportance(p=2)`` (no data) and ``GroupTaylorImportance`` after a
calibration-loss backward (8 samples x 256 tokens). Checks: equal parameters removed within each set-up; the
Torch-Pruning model's config (num_attention_heads, num_key_value_heads, head_dim) and each attention module's
``num_key_value_groups`` against its weights (what Torch-Pruning left stale is recorded, then fixed); a forward
pass; and the same heads removed by ``heads.remove_heads`` give the same logits. Measured: held-out PPL
(``evaluation.perplexity_spread``, first 512 tokens of each of the 10 held-out articles) and the wall time of
each prune step (scoring + graph + surgery; the course's Taylor scores are computed once and their time is
added to every Taylor row). Writes ``results/torch_pruning_heads.json``.

Torch-Pruning is not a course dependency: run it from its own venv layered over the course's (``make tp-venv``
builds ``.venv-tp``: the course's packages plus ``torch-pruning==1.6.1``, nothing else)::

    make tp-venv
    OMP_NUM_THREADS=1 .venv-tp/bin/python benchmarks/torch_pruning_heads.py    # about 4 minutes on one core
    python benchmarks/torch_pruning_heads.py --render    # the report section from the stored results only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import math
import statistics
import sys
import time
from pathlib import Path

from report import write_section

RESULTS = Path(__file__).resolve().parents[1] / "results"


def render(stored: dict) -> str:
    """The report section: both set-ups, every method, PPL with its article range, against the course's Taylor."""
    rows = {(r["setup"], r["method"]): r for r in stored["rows"]}
    lines = [f"SmolLM2 (offline Llama role), Torch-Pruning {stored['torch_pruning_version']} from its own venv over "
             f"the course's (`make tp-venv`). Held-out PPL: the first {stored['tokens_per_document']} tokens of each "
             f"of the 10 held-out articles (`evaluation.perplexity_spread`); paired: mean log-PPL difference to the "
             "course's Taylor row of the same set-up over the articles, +/- its standard error. Prune time: one "
             "core, scoring included (the course's Taylor row: per query head in the GQA set-up, per K/V group "
             "(`head_scores(..., per=\"group\")`) for whole groups).", "",
             "| set-up | method | params removed (M) | PPL (article range) | vs course Taylor | prune s |",
             "|---|---|---|---|---|---|"]
    base = rows["-", "unpruned"]
    lines.append(f"| - | unpruned | 0 | {base['ppl']:.2f} ({min(base['per_document']):.1f}-"
                 f"{max(base['per_document']):.1f}) | | |")
    titles = {"gqa": "one query head per K/V group (Torch-Pruning's GQA set-up)", "groups": "one K/V group per layer"}
    for setup, title in titles.items():
        ref = rows[setup, "course taylor"]
        for (s, method), r in rows.items():
            if s != setup:
                continue
            diffs = [a - b for a, b in zip(r["nll"], ref["nll"], strict=True)]
            paired = ("" if r is ref else f"{statistics.fmean(diffs):+.3f} +/- "
                      f"{statistics.stdev(diffs) / math.sqrt(len(diffs)):.3f}")
            lines.append(f"| {title} | {method} | {r['params_removed'] / 1e6:.2f} | {r['ppl']:.2f} "
                         f"({min(r['per_document']):.1f}-{max(r['per_document']):.1f}) | {paired} | "
                         f"{r['seconds']:.1f} |")
    checks = stored["checks"]
    same = all(checks[f"{s}/{m}"]["max_logit_diff_vs_course_same_heads"] == 0 for s in titles
               for m in ("magnitude", "taylor"))
    stale = checks["gqa/taylor"]["before_fix"]
    lines += ["", f"- The same heads removed by Torch-Pruning and by `heads.remove_heads` give "
              f"{'identical logits (largest difference 0)' if same else 'different logits'} in every set-up: the "
              "methods differ only in which heads they choose.",
              "- Torch-Pruning leaves the config as it was (num_attention_heads "
              f"{stale['config']['num_attention_heads']}, num_key_value_heads "
              f"{stale['config']['num_key_value_heads']}, each module's num_key_value_groups "
              f"{stale['module_num_key_value_groups']}) while the weights shrink; the script fixes them before use.",
              "- Under GQA its head pruning (`MetaPruner`, `num_heads`, `head_pruning_ratio`) removes query heads only "
              "and keeps every K/V head, so it frees no KV cache; whole groups go through its `DependencyGraph` "
              "(declared as 192-wide heads, `MetaPruner` prunes nothing, silently).",
              "- Found while setting it up (probe runs, not stored): with the model's KV cache on, the dependency "
              "search never finished (the cache's concatenation along the sequence reads as a channel "
              "concatenation); tracing with `use_cache=False` and eager attention builds the 30-layer graph in "
              "seconds."]
    return "\n".join(lines) + "\n"


if sys.argv[1:] != ["--render"]:  # measuring needs Torch-Pruning; re-rendering the stored run does not
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    import course_utils
    from course_utils import data, evaluation, heads, importance, models


def attention_report(m) -> dict:
    """What the config and the modules say against what the weights hold (layer 0 and all layers)."""
    cfg = m.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ok = True
    for layer in m.model.layers:
        a = layer.self_attn
        n_q, n_kv = a.q_proj.out_features // 64, a.k_proj.out_features // 64
        ok &= (a.q_proj.out_features == cfg.num_attention_heads * head_dim
               and a.k_proj.out_features == cfg.num_key_value_heads * head_dim
               and a.v_proj.out_features == a.k_proj.out_features and a.o_proj.in_features == a.q_proj.out_features
               and a.num_key_value_groups == n_q // n_kv and head_dim == 64)
    a = m.model.layers[0].self_attn
    return {"config": {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                       "head_dim": getattr(cfg, "head_dim", None)},
            "module_num_key_value_groups": a.num_key_value_groups,
            "weights_layer0": {"q_out": a.q_proj.out_features, "k_out": a.k_proj.out_features,
                               "v_out": a.v_proj.out_features, "o_in": a.o_proj.in_features},
            "consistent": bool(ok)}


def fix_attention_config(m) -> None:
    """Write the head counts the weights hold (uniform over layers) into the config and the modules."""
    a = m.model.layers[0].self_attn
    n_q, n_kv = a.q_proj.out_features // 64, a.k_proj.out_features // 64
    m.config.num_attention_heads, m.config.num_key_value_heads, m.config.head_dim = n_q, n_kv, 64
    for layer in m.model.layers:
        layer.self_attn.num_key_value_groups = n_q // n_kv


def removed_heads(original, pruned, proj: str, n: int) -> dict[int, list[int]]:
    """Which heads of ``proj`` Torch-Pruning removed, per layer, found by matching the surviving weight rows."""
    out = {}
    for i, (lo, lp) in enumerate(zip(original.model.layers, pruned.model.layers, strict=True)):
        w0 = getattr(lo.self_attn, proj).weight.detach().reshape(n, 64, -1)
        w1 = getattr(lp.self_attn, proj).weight.detach().reshape(-1, 64, w0.shape[-1])
        kept = [next(h for h in range(n) if torch.equal(w0[h], row)) for row in w1]
        out[i] = [h for h in range(n) if h not in kept]
    return out


def calibration_backward(m, calibration: list[dict]) -> None:
    """Accumulate the gradient of the mean next-token loss over the calibration batches (padding masked)."""
    for batch in calibration:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100).backward()


def torch_pruning(model, calibration, setup: str, score: str, example) -> tuple[object, float, dict]:
    """Prune a copy with Torch-Pruning; return (model, prune seconds, what the config said before the fix)."""
    m = copy.deepcopy(model)
    default_attn = m.config._attn_implementation  # noqa: SLF001 (the one place transformers keeps it)
    m.set_attn_implementation("eager")  # the graph must see repeat_kv (see the module docstring)
    for p in m.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    imp = (tp.importance.GroupMagnitudeImportance(p=2) if score == "magnitude"
           else tp.importance.GroupTaylorImportance())
    example_inputs = {"input_ids": example, "use_cache": False}
    if setup == "gqa":  # MetaPruner, the way Torch-Pruning's examples/LLMs/prune_llm.py sets it up
        num_heads = {}
        for layer in m.model.layers:
            a = layer.self_attn
            num_heads[a.q_proj], num_heads[a.k_proj], num_heads[a.v_proj] = 9, 3, 3
        ignored = [m.lm_head, m.model.embed_tokens] + [layer.mlp for layer in m.model.layers]
        pruner = tp.pruner.MetaPruner(
            m, example_inputs=example_inputs, output_transform=lambda out: out.logits, importance=imp,
            global_pruning=False, pruning_ratio=1 / 3, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=1 / 3)
        if score == "taylor":
            m.zero_grad()
            calibration_backward(m, calibration)
        for group in pruner.step(interactive=True):
            group.prune()
    else:  # whole K/V groups: the DependencyGraph directly (MetaPruner silently prunes nothing here)
        graph = tp.DependencyGraph().build_dependency(m, example_inputs=example_inputs,
                                                      output_transform=lambda out: out.logits)
        if score == "taylor":
            m.zero_grad()
            calibration_backward(m, calibration)
        for layer in m.model.layers:
            o = layer.self_attn.o_proj  # its input channels = the query heads, in order; K/V follow via repeat_kv
            full = graph.get_pruning_group(o, tp.prune_linear_in_channels, list(range(o.in_features)))
            width = o.in_features // 3  # one K/V group: 3 query heads x 64
            worst = int(imp(full).view(3, width).mean(1).argmin())
            group = graph.get_pruning_group(o, tp.prune_linear_in_channels,
                                            list(range(worst * width, (worst + 1) * width)))
            for i in range(len(group)):  # k/v get each index 3 times (one per query head reading it); the
                dep, idxs = group[i]     # Linear pruner subtracts len(idxs) from out_features, so deduplicate
                group[i] = (dep, sorted(set(idxs)))
            group.prune()
    seconds = time.perf_counter() - start
    m.zero_grad(set_to_none=True)
    for p in m.parameters():
        p.requires_grad_(False)
    stale = attention_report(m)
    fix_attention_config(m)
    m.set_attn_implementation(default_attn)
    return m.eval(), seconds, stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="random draws per set-up")
    parser.add_argument("--tokens-per-document", type=int, default=512)
    parser.add_argument("--example-tokens", type=int, default=8, help="tokens of Torch-Pruning's tracing input")
    parser.add_argument("--no-tp-taylor", action="store_true", help="skip Torch-Pruning's Taylor importance")
    args = parser.parse_args()
    torch.manual_seed(0)
    profile = course_utils.setup(verbose=False)
    model, tokenizer = models.load_model("llama", profile)
    model.eval()
    documents = data.load_documents("evaluation", profile)
    calibration = data.calibration_batches(tokenizer, data.load_texts("calibration", profile), n_samples=8,
                                           seq_len=256, seed=0)
    example = calibration[0]["input_ids"][:1, :args.example_tokens]
    base_params = models.count_parameters(model)
    probe = calibration[0]["input_ids"][:2, :64]
    rows, checks = [], {}

    def measure(method: str, setup: str, m, seconds: float, extra: dict | None = None) -> None:
        with torch.no_grad():
            m(input_ids=probe, use_cache=False)  # forward pass runs
        spread = evaluation.perplexity_spread(m, tokenizer, documents, tokens_per_document=args.tokens_per_document)
        row = {"method": method, "setup": setup, "params_removed": base_params - models.count_parameters(m),
               "ppl": spread.ppl, "per_document": spread.per_document, "nll": spread.nll, "seconds": seconds,
               "heads": [list(heads.head_counts(m)[0])]} | (extra or {})
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
               if k not in ("per_document", "nll")}, flush=True)

    measure("unpruned", "-", model, 0.0)

    start = time.perf_counter()
    per_head = importance.head_scores(model, "taylor", calibration)  # (30, 9)
    taylor_seconds = time.perf_counter() - start
    start = time.perf_counter()
    per_group = importance.head_scores(model, "taylor", calibration, per="group")  # (30, 3): a gate per group
    group_seconds = time.perf_counter() - start
    n_layers, n_groups = per_group.shape
    group_size = per_head.shape[1] // n_groups

    def course(selection: dict[int, list[int]], seconds: float):
        t = time.perf_counter()
        m = heads.remove_heads(copy.deepcopy(model), selection)
        return m, seconds + time.perf_counter() - t

    with torch.no_grad():
        reference = model(input_ids=probe, use_cache=False).logits
    for setup in ("gqa", "groups"):
        tp_models = {}
        for score in ("magnitude",) + (() if args.no_tp_taylor else ("taylor",)):
            m, seconds, stale = torch_pruning(model, calibration, setup, score, example)
            after = attention_report(m)
            if not after["consistent"]:
                raise RuntimeError(f"config still does not match the weights after the fix: {after}")
            # the same heads removed by the course's surgery must give the same logits
            if setup == "gqa":
                same = removed_heads(model, m, "q_proj", 9)
                if any(removed_heads(model, m, "k_proj", 3).values()):
                    raise RuntimeError("Torch-Pruning removed K/V heads in the GQA set-up")
            else:
                same = heads.group_heads(model, removed_heads(model, m, "k_proj", 3))
            twin = heads.remove_heads(copy.deepcopy(model), same)
            with torch.no_grad():
                diff = (m(input_ids=probe, use_cache=False).logits
                        - twin(input_ids=probe, use_cache=False).logits).abs().max().item()
            checks[f"{setup}/{score}"] = {"before_fix": stale, "after_fix": after,
                                          "max_logit_diff_vs_course_same_heads": diff,
                                          "max_logit_change_vs_unpruned": None}
            with torch.no_grad():
                checks[f"{setup}/{score}"]["max_logit_change_vs_unpruned"] = (
                    m(input_ids=probe, use_cache=False).logits - reference).abs().max().item()
            if diff > 1e-3:
                raise RuntimeError(f"{setup}/{score}: Torch-Pruning's model differs from the same heads removed by "
                                   f"heads.remove_heads (max logit diff {diff:.2e})")
            tp_models[score] = m
            measure(f"torch-pruning {score}", setup, m, seconds, {"removed": same})
            del twin
        for m in tp_models.values():
            del m
        if setup == "gqa":  # one query head from every K/V group, per layer
            lowest = per_head.reshape(n_layers, n_groups, group_size).argmin(-1)
            taylor_sel = {i: sorted(g * group_size + int(lowest[i, g]) for g in range(n_groups))
                          for i in range(n_layers)}

            def random_sel(seed):
                draw = torch.randint(0, group_size, (n_layers, n_groups), generator=torch.Generator().manual_seed(seed))
                return {i: sorted(g * group_size + int(draw[i, g]) for g in range(n_groups)) for i in range(n_layers)}
        else:  # one whole K/V group per layer
            taylor_sel = heads.group_heads(model, {i: [int(per_group[i].argmin())] for i in range(n_layers)})

            def random_sel(seed):
                draw = torch.randint(0, n_groups, (n_layers,), generator=torch.Generator().manual_seed(seed))
                return heads.group_heads(model, {i: [int(draw[i])] for i in range(n_layers)})
        m, seconds = course(taylor_sel, taylor_seconds if setup == "gqa" else group_seconds)
        measure("course taylor", setup, m, seconds, {"removed": taylor_sel})
        del m
        for seed in range(args.seeds):
            m, seconds = course(random_sel(seed), 0.0)
            measure(f"course random seed {seed}", setup, m, seconds)
            del m
        removed = {r["params_removed"] for r in rows if r["setup"] == setup}
        checks[f"{setup}/params_removed_equal"] = len(removed) == 1
        if len(removed) != 1:
            raise RuntimeError(f"{setup}: parameters removed differ across methods: {sorted(removed)}")

    out = {"torch_pruning_version": importlib.metadata.version("torch-pruning"),
           "torch_pruning___version__": tp.__version__, "torch": torch.__version__,
           "transformers": importlib.metadata.version("transformers"),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "base_params": base_params,
           "course_taylor_scoring_seconds": taylor_seconds, "tokens_per_document": args.tokens_per_document,
           "example_tokens": args.example_tokens, "checks": checks, "rows": rows}
    (RESULTS / "torch_pruning_heads.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(checks, indent=1))
    write_section(53, "torch_pruning", "Torch-Pruning against the course's head removal (lesson 10)", render(out),
                  measured=measured(out))


def measured(stored: dict) -> str:
    return (f"{stored['date'].replace('T', ' ')[:16]} UTC, one torch thread, torch {stored['torch']}, transformers "
            f"{stored['transformers']}, CPU only")


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        stored = json.loads((RESULTS / "torch_pruning_heads.json").read_text())
        write_section(53, "torch_pruning", "Torch-Pruning against the course's head removal (lesson 10)",
                      render(stored), measured=measured(stored))
    else:
        main()
