"""Issue 19, second step: where does the fast recipe's out-of-domain loss come from, and does a calibration mix help?

Same validation texts and OptiPFair rows as probe.py (read from output.json). Variants of the fast recipe at
10/20/40 %, 128 x 256 calibration paragraphs:
- uniform ratio + OBS + refit (is it the allocation that fits the calibration domain?);
- the allocation + plain selection by the wanda-like score, no refit (is it the refit?);
- a calibration mix: 96 Wikipedia paragraphs + 32 newsgroup posts NOT among the 24 validation posts (statistics
  and probe). Newsgroups are then no longer out of domain for it; its out-of-domain test would be the Lee news
  corpus, which this probe does not touch (a variant worth adopting is measured there by benchmarks/width.py).
Run from the repository root: OMP_NUM_THREADS=1 .venv/bin/python results/logs/width_ood_probe_2026-12-05/probe2.py
"""
import copy, io, json, os, pickle, random, re, zlib
import gensim
import torch
import course_utils
from course_utils import data, evaluation, importance, models, surgery

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
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
ng_val = [[p] for p in posts[:24]]
ng_cal = posts[24:]  # never validated on
cal_texts = data.load_texts("calibration", profile)
used = set()
for n in (64, 96, 128, 256):
    used |= set(random.Random(0).sample(cal_texts, n))
used |= set(random.Random(1).sample(cal_texts, 4))
wiki_val = [[p for p in d if p not in used] for d in random.Random(5).sample(data.load_documents("calibration", profile), 12)]
wiki_val = [d for d in wiki_val if d]
prev = json.load(open(os.path.join(HERE, "output.json")))
b = prev["base"]


def score(model):
    w = evaluation.perplexity_spread(model, tok, wiki_val, tokens_per_document=384, window=384)
    n = evaluation.perplexity_spread(model, tok, ng_val, tokens_per_document=256, window=256)
    return w.ppl, n.ppl


def show(key, s, ratio, results):
    o = prev["rows"][f"optipfair {ratio}"]
    results[key] = s
    print(f"{key}: wiki-val {s[0]:.2f} newsgroups-val {s[1]:.2f}; ratio of PPL increase to OptiPFair's: "
          f"wiki {(s[0] - b[0]) / (o[0] - b[0]):.3f} newsgroups {(s[1] - b[1]) / (o[1] - b[1]):.3f}", flush=True)


RATIOS = (0.1, 0.2, 0.4)
results = {}
probe = data.calibration_batches(tok, cal_texts, n_samples=4, seq_len=128, seed=1)
fit = data.calibration_batches(tok, cal_texts, n_samples=128, seq_len=256, seed=0)
stats = importance.collect_stats(base, fit, gram=True)
curves, _ = surgery.calibrated_curves(base, stats, probe, probe_ratio=0.75, smooth=5)
for ratio in RATIOS:
    m = copy.deepcopy(base)
    surgery.prune_mlp(m, ratio, method="obs", stats=stats)
    show(f"uniform + obs + refit {ratio}", score(m), ratio, results)
    m = copy.deepcopy(base)
    surgery.prune_mlp(m, ratio, method="wanda_like", stats=stats, allocation=surgery.allocate_from_curves(curves, ratio))
    show(f"allocation + wanda_like, no refit {ratio}", score(m), ratio, results)
del stats
mix_texts = random.Random(0).sample(cal_texts, 96) + random.Random(0).sample(ng_cal, 32)
fit = data.calibration_batches(tok, mix_texts, n_samples=128, seq_len=256, seed=0)
mix_probe = data.calibration_batches(tok, random.Random(1).sample(cal_texts, 3) + random.Random(1).sample(ng_cal, 1),
                                     n_samples=4, seq_len=128, seed=1)
stats = importance.collect_stats(base, fit, gram=True)
curves, _ = surgery.calibrated_curves(base, stats, mix_probe, probe_ratio=0.75, smooth=5)
for ratio in RATIOS:
    m = copy.deepcopy(base)
    surgery.prune_mlp(m, ratio, method="obs", stats=stats, allocation=surgery.allocate_from_curves(curves, ratio))
    show(f"mix 96 wiki + 32 newsgroups: allocation + obs + refit {ratio}", score(m), ratio, results)
json.dump(results, open(os.path.join(HERE, "output2.json"), "w"), indent=1)
