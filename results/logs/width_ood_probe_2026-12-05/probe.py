"""Issue 19: is the fast width recipe's advantage over OptiPFair robust out of domain? Measured on VALIDATION text.

Out-of-domain validation text: the 200 Usenet posts (alt.atheism, sci.space, 1993) of gensim's bundled
`mini_newsgroup` test file (a pickled scikit-learn Bunch), headers, quoted lines and attributions removed,
posts with >= 120 words; the first 24 such posts, 256 tokens each. In-domain validation: 12 calibration-split
articles without any paragraph used for fitting or probing, 384 tokens each. The Lee news corpus (the
benchmark's out-of-domain TEST text) and the held-out articles are not used.

Rows: OptiPFair hybrid (MAW + the benchmark's 256 x 256 calibration) and the course's fast recipe (residual
curves x one refitted probe at 75 %, 5-layer median; one-pass OBS + refit) at 10/20/40 %, for calibration sizes
64/128/256 x 256 and, at 128, the refit's ridge towards the plain slice (refit_output's shrink_to_slice)
0.1 (default), 0.3, 1, 3.
Run from the repository root: OMP_NUM_THREADS=1 .venv/bin/python results/logs/width_ood_probe_2026-12-05/probe.py
"""
import copy, functools, gzip, io, json, os, pickle, random, re, sys, time, zlib
import gensim
import torch
import course_utils
from course_utils import data, evaluation, importance, models, surgery
import course_utils.surgery.width as width_mod
from optipfair import prune_model

torch.set_num_threads(1)
profile = course_utils.setup(verbose=False)
base, tok = models.load_model("llama", profile)


class _Bunch(pickle.Unpickler):
    def find_class(self, module, name):
        return dict if name == "Bunch" else super().find_class(module, name)


raw = open(os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "mini_newsgroup"), "rb").read()
posts = []
for post in _Bunch(io.BytesIO(zlib.decompress(raw)), encoding="latin1").load()["data"]:
    body = post.split("\n\n", 1)[1] if "\n\n" in post else post
    lines = [l for l in body.splitlines() if not l.lstrip().startswith((">", "|")) and "writes:" not in l
             and "wrote:" not in l and not l.startswith("In article")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if len(text.split()) >= 120:
        posts.append(text)
print(f"newsgroup posts kept: {len(posts)}", flush=True)
ng_val = [[p] for p in posts[:24]]

cal_texts = data.load_texts("calibration", profile)
used = set()
for n in (64, 128, 256):
    used |= set(random.Random(0).sample(cal_texts, n))
used |= set(random.Random(1).sample(cal_texts, 4))  # the probe
wiki_val = [[p for p in d if p not in used] for d in random.Random(5).sample(data.load_documents("calibration", profile), 12)]
wiki_val = [d for d in wiki_val if d]


def score(model):
    w = evaluation.perplexity_spread(model, tok, wiki_val, tokens_per_document=384, window=384)
    n = evaluation.perplexity_spread(model, tok, ng_val, tokens_per_document=256, window=256)
    return w.ppl, n.ppl


t = time.time()
b = score(base)
print(f"base: wiki-val {b[0]:.2f} newsgroups-val {b[1]:.2f} ({time.time() - t:.0f} s)", flush=True)
results = dict(base=b, rows={})
RATIOS = (0.1, 0.2, 0.4)
calib_opt = data.calibration_batches(tok, cal_texts, n_samples=256, seq_len=256, seed=0)
for ratio in RATIOS:
    m = copy.deepcopy(base)
    t = time.time()
    prune_model(m, pruning_type="MLP_GLU", neuron_selection_method="MAW", pruning_percentage=100 * ratio,
                dataloader=calib_opt, show_progress=False)
    s = score(m)
    results["rows"][f"optipfair {ratio}"] = s
    print(f"optipfair {ratio:.0%}: wiki-val {s[0]:.2f} newsgroups-val {s[1]:.2f} ({time.time() - t:.0f} s)", flush=True)
probe = data.calibration_batches(tok, cal_texts, n_samples=4, seq_len=128, seed=1)
original = width_mod.refit_output
for n in (128, 64, 256):
    fit = data.calibration_batches(tok, cal_texts, n_samples=n, seq_len=256, seed=0)
    stats = importance.collect_stats(base, fit, gram=True)
    curves, _ = surgery.calibrated_curves(base, stats, probe, probe_ratio=0.75, smooth=5)
    for damp in ((0.1, 0.3, 1.0, 3.0) if n == 128 else (0.1,)):
        width_mod.refit_output = functools.partial(original, shrink_to_slice=damp)
        for ratio in RATIOS:
            m = copy.deepcopy(base)
            surgery.prune_mlp(m, ratio, method="obs", stats=stats, allocation=surgery.allocate_from_curves(curves, ratio))
            s = score(m)
            key = f"fast {n} shrink {damp:g} {ratio}"
            results["rows"][key] = s
            o = results["rows"][f"optipfair {ratio}"]
            print(f"{key}: wiki-val {s[0]:.2f} newsgroups-val {s[1]:.2f}; ratio of PPL increase to OptiPFair's: "
                  f"wiki {(s[0] - b[0]) / (o[0] - b[0]):.3f} newsgroups {(s[1] - b[1]) / (o[1] - b[1]):.3f}", flush=True)
    width_mod.refit_output = original
    del stats
json.dump(results, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "output.json"), "w"), indent=1)
