"""Issue 19, probe 4: the sequential variant of the fast recipe (OBS + refit layer by layer on the pruned model's
own activations) against the one-pass default, on the same VALIDATION text as probe.py (12 calibration-split
articles, 24 Usenet posts). Same curves (128 x 256 calibration, probe at 75 %, 5-layer median), same scoring; the
unpruned and OptiPFair rows are read from output.json (probe.py), which scored them the same way.
Run from the repository root: OMP_NUM_THREADS=1 .venv/bin/python results/logs/width_ood_probe_2026-12-05/probe4.py
"""
import copy, io, json, os, pickle, random, re, time, zlib
import gensim
import torch
import course_utils
from course_utils import data, evaluation, importance, models, surgery

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


stored = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "output.json")))
b = stored["base"]
results = dict(base=b, rows={})
RATIOS = (0.1, 0.2, 0.4)
probe = data.calibration_batches(tok, cal_texts, n_samples=4, seq_len=128, seed=1)
fit = data.calibration_batches(tok, cal_texts, n_samples=128, seq_len=256, seed=0)
stats = importance.collect_stats(base, fit, gram=True)
curves, _ = surgery.calibrated_curves(base, stats, probe, probe_ratio=0.75, smooth=5)
for ratio in RATIOS:
    allocation = surgery.allocate_from_curves(curves, ratio)
    for method in ("obs", "obs_sequential"):
        m = copy.deepcopy(base)
        t = time.time()
        if method == "obs":
            surgery.prune_mlp(m, ratio, method="obs", stats=stats, allocation=allocation)
        else:
            surgery.prune_mlp(m, ratio, method="obs_sequential", calibration=fit, allocation=allocation)
        seconds = time.time() - t
        s = score(m)
        key = f"fast 128 {method} {ratio}"
        results["rows"][key] = s
        o = stored["rows"][f"optipfair {ratio}"]
        print(f"{key}: wiki-val {s[0]:.2f} newsgroups-val {s[1]:.2f} (selection + refit {seconds:.0f} s); ratio of PPL "
              f"increase to OptiPFair's: wiki {(s[0] - b[0]) / (o[0] - b[0]):.3f} newsgroups "
              f"{(s[1] - b[1]) / (o[1] - b[1]):.3f}", flush=True)
json.dump(results, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "output4.json"), "w"), indent=1)
