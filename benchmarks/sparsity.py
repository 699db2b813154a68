"""Unstructured and 2:4 sparsity: the course's Wanda and SparseGPT side by side with llmcompressor's (lesson 11).

A correctness check (issue 17): on SmolLM2 (offline Llama role), the course's ``sparsity.wanda_scores`` +
``masks_from_scores`` and ``sparsity.sparsegpt`` against llmcompressor's ``WandaPruningModifier`` and
``SparseGPTModifier`` at 50 % unstructured and at 2:4, on the same calibration tokens (lesson 11's: 16 seeded
calibration paragraphs cut to 128 tokens) and the same held-out text. Only the decoder's projections are pruned
(q, k, v, o, gate, up, down of every layer); embeddings, norms and the tied LM head stay dense in both.

llmcompressor pins transformers<=5.17 and the course 5.24, so llmcompressor runs in its own virtual environment
(``--llmc-python``, default .venv-llmc/bin/python, made by ``make llmc-venv``; ``LLMC_PYTHON`` overrides; without
it the script says so and keeps the stored section) as a subprocess of this script: it reads the calibration
tokens this script wrote, prunes with ``oneshot`` and stores the whole pruned model as plain dense safetensors
(``safetensors.torch.save_model``); this script loads those weights into a copy of the course's model and
measures every model, the course's and llmcompressor's, with the same course functions: measured sparsity of the
projections and held-out perplexity spread over the ten held-out articles (``evaluation.perplexity_spread``).

Target: the course's PPL within 2 % of llmcompressor's for each method and pattern. Two checks explain the gaps:
llmcompressor's Wanda with ``propagate_error=False`` (statistics from the unpruned model, as the course takes them),
and the course's SparseGPT re-run on the same tokens as one unpadded paragraph per batch (its numerical spread).

Run: ``python benchmarks/sparsity.py [--eval-tokens 16384] [--calib-samples 16] [--calib-len 128]``
(``make benchmarks``). The subprocess is this same file: ``<llmc-python> benchmarks/sparsity.py --llmc-worker
job.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
LLMC_PYTHON = os.environ.get("LLMC_PYTHON", str(HERE.parent.parent / ".venv-llmc" / "bin" / "python"))  # make llmc-venv
LAYERS = r"re:model\.layers\.\d+$"  # llmcompressor targets: each decoder layer, whose nn.Linear modules it prunes
IGNORE = ["re:.*lm_head"]
SGPT = dict(block_size=128, dampening_frac=0.01)  # llmcompressor's defaults; the course's _obs_prune uses the same
PATTERNS = {"50 %": dict(sparsity=0.5, nm=None, mask_structure="0:0"),
            "2:4": dict(sparsity=0.5, nm=(2, 4), mask_structure="2:4")}
TARGET = 0.02


# --------------------------------------------------------------------------------------------------------------
# The llmcompressor side: runs in llmcompressor's own venv (no course_utils there), one job per process.
# --------------------------------------------------------------------------------------------------------------
def llmc_worker(job_file: str) -> None:
    """Prune with llmcompressor's oneshot as ``job_file`` says; store dense safetensors and a result json."""
    from importlib.metadata import version

    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    job = json.loads(Path(job_file).read_text())
    samples = json.loads(Path(job["calibration"]).read_text())  # unpadded token ids, one list per paragraph
    dataset = datasets.Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    model.eval()
    kind = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[job["method"]]
    options = dict(sparsity=job["sparsity"], mask_structure=job["mask_structure"], targets=[LAYERS], ignore=IGNORE)
    if job["method"] == "sparsegpt":
        options |= SGPT
    options |= job.get("options", {})  # e.g. OWL's sparsity_profile="owl", owl_m, owl_lmbda
    if options.get("sparsity_profile") == "owl":  # two fixes to llmcompressor 0.14.0.1's OWL: see owl_activations
        infer = getattr(kind, "_infer_owl_layer_sparsity")  # noqa: B009
        setattr(kind, "_get_activations", owl_activations)  # noqa: B010 (replaces llmcompressor's method)
        setattr(kind, "_infer_owl_layer_sparsity",  # noqa: B010
                lambda self, *a, **k: list(infer(self, *a, **k).values()))
    recipe = kind(**options)
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, pipeline="sequential", batch_size=1,
            num_calibration_samples=len(samples), shuffle_calibration_samples=False,
            propagate_error=job.get("propagate_error", True))
    seconds = time.perf_counter() - start
    out = Path(job["out"])
    save_model(model, str(out / "model.safetensors"))  # plain dense tensors, tied LM head stored once
    (out / "result.json").write_text(json.dumps(dict(
        seconds=seconds, recipe=repr(recipe), tokens=sum(map(len, samples)), samples=len(samples),
        versions={p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch",
                                          "datasets", "safetensors")},
        python=sys.version.split()[0], executable=sys.executable)))


def owl_activations(self, model, dataloader, nsamples: int = 128) -> dict:
    """llmcompressor 0.14.0.1's OWL statistics without its failing calibration call.

    ``_get_activations`` runs ``run_calibration`` from inside the modifier's ``on_initialize``, which raises
    "Cannot invoke event before initializing" (its lifecycle events are not open yet), so ``sparsity_profile="owl"``
    fails for Wanda and SparseGPT alike. This replacement computes the same quantity (per Linear input feature,
    the sum over calibration samples of the sample's L2 norm, divided by ``nsamples`` as llmcompressor does) with
    plain forward passes; llmcompressor's own ``_infer_owl_layer_sparsity`` then turns it into layer sparsities.
    Second fix: that method returns a dict {layer name: sparsity}, which ``on_calibration_start`` does not accept
    (it matches a list, else uses the value as one number: "unsupported operand type(s) for *: 'int' and
    'dict'"), so the worker hands it on as a list in the layers' order (the same order as its target layers).
    """
    from collections import defaultdict

    acts = defaultdict(int)

    def save(name):
        def fn(_module, args):
            acts[name] += 1.0 / nsamples * args[0].pow(2).sum(dim=(0, 1)).sqrt()
        return fn

    handles = [mod.register_forward_pre_hook(save(name)) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and "lm_head" not in name]
    try:
        with torch.no_grad():
            for batch in dataloader:
                model(**{k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
    finally:
        for handle in handles:
            handle.remove()
    return acts


# --------------------------------------------------------------------------------------------------------------
# The course side (main venv).
# --------------------------------------------------------------------------------------------------------------
def llmc_available(python: str) -> bool:
    """Whether ``python`` runs and has llmcompressor (its own venv: ``make llmc-venv``)."""
    if not Path(python).exists():
        return False
    probe = subprocess.run([python, "-c", "import llmcompressor"], capture_output=True, text=True)
    return probe.returncode == 0


def run_llmcompressor(python: str, job: dict, out: Path, base, log, log_file):
    """Run one llmcompressor job (``llmc_worker`` in llmcompressor's venv) and load its weights into a copy of
    ``base``: (model, result json, wall seconds of the subprocess, command)."""
    from safetensors.torch import load_model

    out.mkdir()
    job = dict(job, out=str(out))
    (out / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH="")
    env.pop("VIRTUAL_ENV", None)
    command = [python, str(HERE), "--llmc-worker", str(out / "job.json")]
    log("$ " + " ".join(command), json.dumps(job))
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE.parent.parent)
    wall = time.perf_counter() - t0
    with (out / "worker.log").open("w") as f:
        f.write(done.stdout + done.stderr)
    log_file.write(f"--- llmcompressor {out.name} output (last 40 lines) ---\n"
                   + "\n".join((done.stdout + done.stderr).splitlines()[-40:]) + "\n---\n")
    if done.returncode:
        raise SystemExit(f"llmcompressor worker failed ({done.returncode}); see {out / 'worker.log'}:\n"
                         + (done.stdout + done.stderr)[-3000:])
    result = json.loads((out / "result.json").read_text())
    model = copy.deepcopy(base)
    missing, unexpected = load_model(model, str(out / "model.safetensors"), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    (out / "model.safetensors").unlink()  # 0.5 GB each
    return model, result, wall, command


def main() -> None:
    from report import RESULTS, dated_log, start_run, write_section

    from course_utils import data, evaluation, sparsity

    run = start_run(__doc__.split("\n")[0], calib_samples=16,
                    extra=[("--calib-len", int, 128, "calibration tokens per paragraph (lesson 11: 128)"),
                           ("--llmc-python", str, LLMC_PYTHON, "python of the venv with llmcompressor")])
    args, base, tokenizer, profile = run.args, run.base, run.tokenizer, run.profile
    if not llmc_available(args.llmc_python):  # the stored section stays: `make course` runs on without this comparison
        print(f"skipped: no llmcompressor at {args.llmc_python}. Its pins (transformers<=5.17) clash with the "
              "course's, so it lives in its own venv: `make llmc-venv` (or set LLMC_PYTHON / pass --llmc-python). "
              "results/sections/55_sparsity.md keeps the last measured comparison, with its date.")
        return
    base.to("cpu")
    started = time.perf_counter()
    log, log_file = dated_log("sparsity")

    # the lesson's calibration set: data.calibration_batches(..., n_samples=16, seq_len=128), seed 0
    calibration = data.calibration_batches(tokenizer, data.load_texts("calibration", profile),
                                           n_samples=args.calib_samples, seq_len=args.calib_len)
    samples = [ids[mask.bool()].tolist() for batch in calibration
               for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    documents = data.load_documents("evaluation", profile)
    per_doc = max(64, args.eval_tokens // len(documents))
    work = Path(tempfile.mkdtemp(prefix="sparsity."))
    (work / "calibration.json").write_text(json.dumps(samples))
    log(f"calibration: {len(samples)} paragraphs, {sum(map(len, samples))} real tokens "
        f"(lengths {min(map(len, samples))}-{max(map(len, samples))}); held-out: {len(documents)} articles x "
        f"{per_doc} tokens; work dir {work}; torch threads {torch.get_num_threads()}")
    base_names = set(sparsity.linear_layers(base))
    other_params = {n: p.detach().clone() for n, p in base.named_parameters()
                    if n.rsplit(".", 1)[0] not in base_names}

    def measure(name: str, model, method: str, pattern: str, source: str, seconds: float | None, **extra) -> dict:
        t0 = time.perf_counter()
        weights = {n: m.weight.detach() for n, m in sparsity.linear_layers(model).items()}
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        groups_ok = sum(int(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).sum()) for w in weights.values())
        params = dict(model.named_parameters())
        others_changed = max(float((params[n].detach() - p).abs().max()) for n, p in other_params.items())
        spread = evaluation.perplexity_spread(model, tokenizer, documents, tokens_per_document=per_doc)
        row = dict(variant=name, method=method, pattern=pattern, source=source, prune_s=seconds,
                   sparsity=zeros / total, groups_2of4=groups_ok / (total // 4), others_max_change=others_changed,
                   ppl=spread.ppl, per_document=spread.per_document, nll=spread.nll, tokens=spread.tokens,
                   eval_s=time.perf_counter() - t0, **extra)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                        if not isinstance(v, list)}))
        return row

    rows = [measure("unpruned", base, "none", "dense", "-", None)]
    zero_masks: dict[str, dict[str, torch.Tensor]] = {}

    def remember(key: str, model) -> None:
        zero_masks[key] = {n: m.weight.detach() == 0 for n, m in sparsity.linear_layers(model).items()}

    # ---- the course ----------------------------------------------------------------------------------------
    for pattern, spec in PATTERNS.items():
        t0 = time.perf_counter()
        scores = sparsity.wanda_scores(base, calibration)
        model = sparsity.bake(sparsity.apply_masks(copy.deepcopy(base), sparsity.masks_from_scores(
            scores, spec["sparsity"], scope="row", nm=spec["nm"])))
        seconds = time.perf_counter() - t0
        remember(f"course wanda {pattern}", model)
        rows.append(measure(f"course Wanda {pattern}", model, "wanda", pattern, "course", seconds))
        del model
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        sparsity.sparsegpt(model, calibration, spec["sparsity"], nm=spec["nm"])
        sparsity.bake(model)
        seconds = time.perf_counter() - t0
        remember(f"course sparsegpt {pattern}", model)
        rows.append(measure(f"course SparseGPT {pattern}", model, "sparsegpt", pattern, "course", seconds))
        del model

    # ---- llmcompressor, in its own venv ---------------------------------------------------------------------
    model_dir = Path(base.name_or_path)
    if not (model_dir / "config.json").exists():  # not loaded from a local directory: hand llmcompressor a copy
        model_dir = work / "base"
        base.save_pretrained(model_dir)
    llmc_meta = {}

    def llmcompressor(method: str, pattern: str, propagate_error: bool = True):
        key = f"{method}_{pattern.replace(' %', '').replace(':', 'of')}_{'seq' if propagate_error else 'dense'}"
        job = dict(method=method, sparsity=PATTERNS[pattern]["sparsity"],
                   mask_structure=PATTERNS[pattern]["mask_structure"], calibration=str(work / "calibration.json"),
                   model=str(model_dir), propagate_error=propagate_error)
        model, result, wall, command = run_llmcompressor(args.llmc_python, job, work / key, base, log, log_file)
        llmc_meta.update(versions=result["versions"], python=result["python"], executable=result["executable"])
        return model, result, wall, command

    for pattern in PATTERNS:
        for method, label in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
            model, result, wall, command = llmcompressor(method, pattern)
            remember(f"llmcompressor {method} {pattern}", model)
            rows.append(measure(f"llmcompressor {label} {pattern}", model, method, pattern, "llmcompressor",
                                result["seconds"], process_s=wall, recipe=result["recipe"],
                                command=" ".join(command)))
            del model

    # ---- mask agreement between the two libraries, overall and per decoder layer -----------------------------
    def agreement(mine: dict, theirs: dict) -> tuple[float, list[float]]:
        per_layer = [sum(int((mine[n] == theirs[n]).sum()) for n in layer)
                     / sum(mine[n].numel() for n in layer) for layer in layer_names]
        return sum(int((mine[n] == theirs[n]).sum()) for n in mine) / sum(m.numel() for m in mine.values()), per_layer

    layer_names = [list(layer) for layer in sparsity.projections_by_layer(base)]
    base_linear = sparsity.linear_layers(base)
    for r in rows[1:]:
        if r["source"] == "course":
            r["mask_agreement"], r["agreement_per_layer"] = agreement(
                zero_masks[f"course {r['method']} {r['pattern']}"],
                zero_masks[f"llmcompressor {r['method']} {r['pattern']}"])
            log(f"{r['variant']}: zero pattern agrees with llmcompressor's on {r['mask_agreement']:.2%} of weights; "
                "per layer " + " ".join(f"{a:.3f}" for a in r["agreement_per_layer"]))

    # ---- diagnostics ---------------------------------------------------------------------------------------
    # 1. llmcompressor's Wanda with statistics from the unpruned model (propagate_error=False), as the course's
    #    wanda_scores takes them: same masks? (same masks = same weights, so the course row's PPL applies)
    # 2. the course's SparseGPT run again on the same tokens, one unpadded paragraph per batch (what
    #    llmcompressor is fed): the same arithmetic in another summation order, i.e. the numerical spread of the
    #    method itself on this calibration set
    diagnostics = []
    for pattern in PATTERNS:
        model, result, wall, command = llmcompressor("wanda", pattern, propagate_error=False)
        course_row = next(r for r in rows if r["variant"] == f"course Wanda {pattern}")
        theirs = {n: m.weight.detach() == 0 for n, m in sparsity.linear_layers(model).items()}
        course_zeros = zero_masks[f"course wanda {pattern}"]  # the course's Wanda weights: base weights, zeroed
        same_weights = all(torch.equal(m.weight.detach(), base_linear[n].weight.detach().masked_fill(
            course_zeros[n], 0)) for n, m in sparsity.linear_layers(model).items())
        agree, per_layer = agreement(zero_masks[f"course wanda {pattern}"], theirs)
        differ = sum(int((zero_masks[f"course wanda {pattern}"][n] != theirs[n]).sum()) for n in theirs)
        extra = dict(process_s=wall, recipe=result["recipe"], mask_agreement=agree, agreement_per_layer=per_layer,
                     zeros_differ=differ, weights=sum(t.numel() for t in theirs.values()),
                     same_weights_as_course=same_weights, compared_with=course_row["variant"],
                     command=" ".join(command) + " (job: propagate_error=false)")
        name = f"llmcompressor Wanda {pattern}, propagate_error=False"
        if same_weights:  # bitwise the course's weights: its measurement stands for this model too
            row = {k: course_row[k] for k in ("sparsity", "groups_2of4", "others_max_change", "ppl",
                                               "per_document", "nll", "tokens")}
            row |= dict(variant=name, method="wanda", pattern=pattern, source="llmcompressor",
                        prune_s=result["seconds"], **extra)
        else:
            row = measure(name, model, "wanda", pattern, "llmcompressor", result["seconds"], **extra)
        log(f"{name}: zero pattern agrees with the course's Wanda on {agree:.2%} of weights; "
            f"bitwise the same weights: {same_weights}")
        diagnostics.append(row)
        del model
    cal_single = [{k: v[i:i + 1, :int(batch["attention_mask"][i].sum())] for k, v in batch.items()}
                  for batch in calibration for i in range(batch["input_ids"].shape[0])]
    assert [b["input_ids"][0].tolist() for b in cal_single] == samples
    for pattern, spec in PATTERNS.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        sparsity.sparsegpt(model, cal_single, spec["sparsity"], nm=spec["nm"])
        sparsity.bake(model)
        seconds = time.perf_counter() - t0
        zeros = {n: m.weight.detach() == 0 for n, m in sparsity.linear_layers(model).items()}
        agree, per_layer = agreement(zeros, zero_masks[f"course sparsegpt {pattern}"])
        agree_llmc, per_layer_llmc = agreement(zeros, zero_masks[f"llmcompressor sparsegpt {pattern}"])
        row = measure(f"course SparseGPT {pattern}, batches of 1", model, "sparsegpt", pattern, "course",
                      seconds, compared_with=f"course SparseGPT {pattern}", mask_agreement=agree,
                      agreement_per_layer=per_layer, mask_agreement_llmc=agree_llmc,
                      agreement_per_layer_llmc=per_layer_llmc)
        log(f"{row['variant']}: zero pattern agrees with the first run on {agree:.2%}, with llmcompressor's on "
            f"{agree_llmc:.2%}; per layer vs batch 8: " + " ".join(f"{a:.3f}" for a in per_layer))
        diagnostics.append(row)
        del model

    pairs = []
    by_name = {r["variant"]: r for r in rows + diagnostics}
    for pattern in PATTERNS:
        for label in ("Wanda", "SparseGPT"):
            course, llmc = by_name[f"course {label} {pattern}"], by_name[f"llmcompressor {label} {pattern}"]
            mean, se = paired(course, llmc)
            ratio = course["ppl"] / llmc["ppl"]
            pair = dict(method=label, pattern=pattern, ratio=ratio, log_diff=mean, se=se, met=abs(ratio - 1) <= TARGET,
                        mask_agreement=course["mask_agreement"], agreement_per_layer=course["agreement_per_layer"])
            if label == "Wanda":
                check = by_name[f"llmcompressor Wanda {pattern}, propagate_error=False"]
                pair |= dict(check=check["variant"], same_weights=check["same_weights_as_course"],
                             check_agreement=check["mask_agreement"], check_differ=check["zeros_differ"],
                             check_weights=check["weights"],
                             sequential_ratio=llmc["ppl"] / check["ppl"])
            else:
                check = by_name[f"course SparseGPT {pattern}, batches of 1"]
                pair |= dict(check=check["variant"], noise_ratio=check["ppl"] / course["ppl"],
                             noise_log_diff=paired(check, course), noise_agreement=check["mask_agreement"],
                             noise_agreement_llmc=check["mask_agreement_llmc"],
                             within_noise=abs(math.log(ratio)) <= abs(math.log(check["ppl"] / course["ppl"])))
            pairs.append(pair)
            log(f"{label} {pattern}: course/llmcompressor PPL {ratio:.4f}, paired log-PPL difference "
                f"{mean:+.4f} +/- {se:.4f}, within 2 %: {pair['met']}")
    total_s = time.perf_counter() - started
    setup = dict(calib_samples=args.calib_samples, calib_len=args.calib_len, calib_batches=len(calibration),
                 calib_batch_size=max(b["input_ids"].shape[0] for b in calibration),
                 calib_tokens=sum(map(len, samples)),
                 eval_tokens=args.eval_tokens, per_document=per_doc, documents=len(documents),
                 llmc_python=args.llmc_python, llmcompressor=llmc_meta, sgpt=SGPT, targets=LAYERS, ignore=IGNORE,
                 torch_threads=torch.get_num_threads(), total_s=total_s,
                 course_versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__))
    (RESULTS / "sparsity.json").write_text(json.dumps(dict(setup=setup, rows=rows, pairs=pairs,
                                                           diagnostics=diagnostics), indent=1))
    write_section(55, "sparsity", "Unstructured and 2:4 sparsity against llmcompressor (lesson 11)",
                  render(rows, pairs, diagnostics, setup))
    log(f"total {total_s:.0f} s; wrote results/sparsity.json and results/sections/55_sparsity.md")
    log_file.close()
    shutil.rmtree(work, ignore_errors=True)


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean over the articles of log-PPL(a) - log-PPL(b), and its standard error."""
    diffs = [x - y for x, y in zip(a["nll"], b["nll"], strict=True)]
    mean = sum(diffs) / len(diffs)
    return mean, math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def ppl_cell(r: dict) -> str:
    return f"{r['ppl']:.2f} ({min(r['per_document']):.1f}-{max(r['per_document']):.1f})"


def layers_text(per_layer: list[float]) -> str:
    later = per_layer[5:]
    return (f"layer 0 {per_layer[0]:.1%}, layer 1 {per_layer[1]:.1%}, layers 5-{len(per_layer) - 1} "
            f"{min(later):.1%}-{max(later):.1%}")


def explain(p: dict) -> str:
    verdict = "**met**" if p["met"] else "**not met**"
    head = (f"- {p['method']} {p['pattern']}: the course's PPL is {p['ratio']:.1%} of llmcompressor's (paired "
            f"log-PPL {p['log_diff']:+.3f} +/- {p['se']:.3f}); 2 % target {verdict}. The zero patterns agree on "
            f"{p['mask_agreement']:.1%} of the projection weights ({layers_text(p['agreement_per_layer'])}). ")
    if p["method"] == "Wanda":
        if p["same_weights"] or p["check_agreement"] >= 0.9999:
            same = ("bitwise the course's weights" if p["same_weights"] else
                    f"the course's zeros on all but {p['check_differ']:,} of the {p['check_weights']:,} weights "
                    f"(float32 against float64 norms decide those near-ties)")
            return head + (
                f"llmcompressor's Wanda with `propagate_error=False` (input norms from the unpruned model, as the "
                f"course's `wanda_scores` takes them) gives {same}, so the two compute the same score and mask; "
                f"the whole difference is the order of the statistics: by default llmcompressor measures each "
                f"layer's input norms on the output of the layers already pruned (as the Wanda "
                f"paper's code does), the course in one pass of the unpruned model. Here the sequential statistics "
                f"change llmcompressor's PPL by {p['sequential_ratio'] - 1:+.1%}.")
        return head + "llmcompressor's Wanda with `propagate_error=False` does **not** reproduce the course's weights."
    noise = p["noise_ratio"] - 1
    text = head + (
        f"With the same layer inputs (layer 0) the two implementations choose the same zeros; after that each "
        f"layer sees the output of layers pruned in slightly different floating-point arithmetic (the course: "
        f"right-padded batches and a float64 Gram matrix and inverse; llmcompressor: one paragraph per batch, "
        f"float32), and the differences grow layer by layer. The course's own SparseGPT, run again on the same "
        f"tokens as one paragraph per batch (the same arithmetic, another summation order), agrees with its first "
        f"run on {p['noise_agreement']:.1%} of the zeros (the course and llmcompressor: {p['mask_agreement']:.1%}) "
        f"and moves its PPL by {noise:+.1%} (paired {p['noise_log_diff'][0]:+.3f} +/- {p['noise_log_diff'][1]:.3f}).")
    if p["met"]:
        return text
    if p["within_noise"]:
        return text + (" The gap to llmcompressor is no larger than what the summation order alone moves: the "
                       "implementations agree, and at this calibration size the 2 % target is finer than the "
                       "method's own numerical spread.")
    return text + " The gap to llmcompressor is larger than what the summation order alone moved in this re-run."


def render(rows: list[dict], pairs: list[dict], diagnostics: list[dict], setup: dict) -> str:
    pair_of = {(p["method"], p["pattern"]): p for p in pairs}
    lines = ["| variant | projection sparsity | held-out PPL (article range) | prune time (s) | "
             "course / llmcompressor PPL | paired log-PPL diff. +/- se | within 2 % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        time_s = "-" if r["prune_s"] is None else f"{r['prune_s']:.1f}"
        if r["source"] == "llmcompressor":
            time_s += f" (process {r['process_s']:.0f})"
        sparsity = f"{r['sparsity']:.2%}"
        if r["pattern"] == "2:4":
            sparsity += f", 2:4 in {r['groups_2of4']:.1%} of groups"
        pair = pair_of.get((r["variant"].split()[1], r["pattern"])) if r["source"] == "course" else None
        compare = (f"{pair['ratio']:.4f} | {pair['log_diff']:+.4f} +/- {pair['se']:.4f} | "
                   f"{'**met**' if pair['met'] else '**not met**'}") if pair else " | | "
        lines.append(f"| {r['variant']} | {sparsity} | {ppl_cell(r)} | {time_s} | {compare} |")
    dense_changes = max(r["others_max_change"] for r in rows)
    by_name = {r["variant"]: r for r in rows}
    diag = ["| check | compared with | held-out PPL (article range) | PPL ratio to it | paired log-PPL diff. +/- se "
            "| zeros agree with it | prune time (s) |", "|---|---|---|---|---|---|---|"]
    for d in diagnostics:
        other = by_name[d["compared_with"]]
        mean, se = paired(d, other)
        same = " (bitwise the same weights)" if d.get("same_weights_as_course") else ""
        diag.append(f"| {d['variant']} | {d['compared_with']} | {ppl_cell(d)} | {d['ppl'] / other['ppl']:.4f} | "
                    f"{mean:+.4f} +/- {se:.4f} | {d['mask_agreement']:.2%}{same} | {d['prune_s']:.1f} |")
    meta = setup["llmcompressor"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    llmc_rows = [r for r in rows if r["source"] == "llmcompressor"]
    met = sum(p["met"] for p in pairs)
    return (
        f"SmolLM2 (offline Llama role). Calibration: lesson 11's set, {setup['calib_samples']} seeded calibration "
        f"paragraphs cut to {setup['calib_len']} tokens ({setup['calib_tokens']:,} real tokens), the same token ids "
        f"for both libraries (the course's right-padded batches of up to {setup['calib_batch_size']} with padding "
        f"excluded from its statistics; "
        f"llmcompressor one unpadded paragraph per batch). Held-out PPL: the first {setup['per_document']:,} tokens "
        f"of each of the {setup['documents']} held-out articles (`evaluation.perplexity_spread`), the same "
        f"function and budget for every model. Pruned: the 210 decoder projections (q, k, v, o, gate, up, down); "
        f"embeddings, norms and the tied LM head stay dense in every row (largest change to any other parameter: "
        f"{dense_changes:g}). Sparsity is measured on the weights evaluated; for 2:4 also the share of groups of 4 "
        f"consecutive input weights with at most 2 non-zeros. Prune time: one core "
        f"({setup['torch_threads']} torch thread), calibration included; for llmcompressor the `oneshot` call "
        f"alone, with the whole subprocess (imports, loading, saving) in brackets. The ratio compares the PPL of "
        f"the course's row with llmcompressor's row of the same method and pattern; the paired difference is the "
        f"mean over the articles of the log-PPL difference (course - llmcompressor) with its standard error "
        f"(articles weighted equally, so it can differ from the log of the pooled ratio).\n\n"
        f"How llmcompressor was run: its pins (transformers<=5.17) clash with the course's, so it has its own venv "
        f"({meta['executable']}, Python {meta['python']}; {versions}), made with `python3 -m venv /work/llmc-venv; "
        f"pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; pip install "
        f"llmcompressor==0.14.0.1`. This script writes the calibration token ids to a json file and runs, per row, "
        f"`{llmc_rows[0]['command'].split(' --llmc-worker')[0]} --llmc-worker job.json`: the worker builds a "
        f"`datasets.Dataset` of the token ids, loads the model with `AutoModelForCausalLM.from_pretrained` "
        f"(float32), calls `oneshot(model, dataset, recipe, pipeline=\"sequential\", batch_size=1, "
        f"num_calibration_samples={setup['calib_samples']}, shuffle_calibration_samples=False)` with the recipe "
        f"below, and stores the whole model as dense safetensors (`safetensors.torch.save_model`); this script "
        f"loads them into a copy of the course's model (strict) and evaluates it like the course's rows. "
        f"Recipes: `{llmc_rows[0]['recipe']}`; `{llmc_rows[1]['recipe']}` (2:4: `mask_structure=\"2:4\"`). "
        f"The course's rows: `sparsity.masks_from_scores(sparsity.wanda_scores(model, calibration), 0.5, "
        f"scope=\"row\", nm=None or (2, 4))` and `sparsity.sparsegpt(model, calibration, 0.5, nm=None or (2, 4))` "
        f"(block 128, dampening 0.01 of the mean diagonal, layer by layer on the pruned stream: the same "
        f"hyperparameters as llmcompressor's defaults).\n\n"
        + "\n".join(lines) + f"\n\nTarget (course within 2 % of llmcompressor's PPL): met for {met} of "
        f"{len(pairs)} pairs.\n\n" + "\n".join(explain(p) for p in pairs) + "\n\n"
        "Checks behind these explanations, from the same run: llmcompressor's Wanda with `propagate_error=False` "
        "(every layer's statistics from the unpruned model), and the course's SparseGPT on the same tokens fed as "
        f"{setup['calib_samples']} unpadded batches of one paragraph instead of right-padded batches of up to "
        f"{setup['calib_batch_size']} ({setup['calib_batches']} of them).\n\n" + "\n".join(diag)
        + f"\n\nWhole run: {setup['total_s'] / 60:.1f} min on one core. Raw numbers (per-article values, per-layer "
        f"agreement): `results/sparsity.json`; log: `results/logs/sparsity_<date>.log`.\n"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--llmc-worker":
        llmc_worker(sys.argv[2])
    else:
        sys.path.insert(0, str(HERE.parent))
        main()
