"""Issue 19, third step: which layers make uniform OBS + refit fail out of domain?

Each layer alone loses 20 % of its MLP neurons by OBS + refit (128 x 256 calibration statistics), the others
untouched; loss increase (nats/token) on 8 newsgroup validation posts x 256 tokens and on 6 Wikipedia validation
articles x 256 tokens (subsets of probe.py's validation sets). Also the same layer pruned by the wanda-like score
without refit, for layers 0-3 and 26-29.
Run from the repository root: OMP_NUM_THREADS=1 .venv/bin/python results/logs/width_ood_probe_2026-12-05/probe3.py
"""
import copy, io, math, os, pickle, random, re, zlib
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
ng_val = [[p] for p in posts[:8]]
cal_texts = data.load_texts("calibration", profile)
used = set()
for n in (64, 128, 256):
    used |= set(random.Random(0).sample(cal_texts, n))
used |= set(random.Random(1).sample(cal_texts, 4))
wiki_val = [[p for p in d if p not in used] for d in random.Random(5).sample(data.load_documents("calibration", profile), 12)]
wiki_val = [d for d in wiki_val if d][:6]


def nll(model):
    w = evaluation.perplexity_spread(model, tok, wiki_val, tokens_per_document=256, window=256)
    n = evaluation.perplexity_spread(model, tok, ng_val, tokens_per_document=256, window=256)
    return math.log(w.ppl), math.log(n.ppl)


b = nll(base)
fit = data.calibration_batches(tok, cal_texts, n_samples=128, seq_len=256, seed=0)
stats = importance.collect_stats(base, fit, gram=True)
n_layers = len(stats)
print("layer  obs+refit: wiki  newsgroups   | wanda_like no refit: wiki newsgroups", flush=True)
for layer in range(n_layers):
    alloc = {i: (0.2 if i == layer else 0.0) for i in range(n_layers)}
    m = copy.deepcopy(base)
    surgery.prune_mlp(m, 0.2 / n_layers, method="obs", stats=stats, allocation=alloc)
    s = nll(m)
    line = f"{layer:5d}  {s[0] - b[0]:+.4f}  {s[1] - b[1]:+.4f}"
    if layer < 4 or layer >= n_layers - 4:
        m = copy.deepcopy(base)
        surgery.prune_mlp(m, 0.2 / n_layers, method="wanda_like", stats=stats, allocation=alloc)
        s = nll(m)
        line += f"   | {s[0] - b[0]:+.4f}  {s[1] - b[1]:+.4f}"
    print(line, flush=True)
