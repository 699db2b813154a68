"""Issue 19 exploration: which cheap damage-curve model gives an allocation close to the measured curves'?

Step 1 (cached in /tmp/w19): Gram statistics on the default fit (64 x 256, seed 0), residual curves, and
damage curves measured at every grid ratio on the fast probe (4 x 128, seed 1).
Step 2: allocations from candidate curve models at 10/20/40 %, each pruned in one pass (OBS + refit on the
64 x 256 statistics) and scored on a VALIDATION set: calibration-split articles with the fit paragraphs taken
out (the first 384 tokens of 12 articles), never the held-out evaluation articles.
"""
import json, random, sys, time
from pathlib import Path
import copy
import torch
import course_utils
from course_utils import data, evaluation, importance, models, surgery
from course_utils.allocation import CURVE_GRID

torch.set_num_threads(2)
C = Path("/tmp/w19")
profile = course_utils.setup(verbose=False)
base, tok = models.load_model("llama", profile)
cal_texts = data.load_texts("calibration", profile)
fit_chosen = set(random.Random(0).sample(cal_texts, 64))
fit = data.calibration_batches(tok, cal_texts, n_samples=64, seq_len=256, seed=0)
docs = data.load_documents("calibration", profile)
rng = random.Random(5)
val_docs = [[p for p in d if p not in fit_chosen] for d in rng.sample(docs, 12)]
val_docs = [d for d in val_docs if d]
t = time.time()
if (C / "stats64.pt").exists():
    stats = torch.load(C / "stats64.pt", weights_only=False)
else:
    stats = importance.collect_stats(base, fit, gram=True); torch.save(stats, C / "stats64.pt")
print("stats", round(time.time() - t), flush=True); t = time.time()
if (C / "res64.pt").exists():
    res = torch.load(C / "res64.pt")
else:
    res = surgery.residual_curves(base, stats); torch.save(res, C / "res64.pt")
print("residuals", round(time.time() - t), flush=True); t = time.time()
probe = data.calibration_batches(tok, cal_texts, n_samples=4, seq_len=128, seed=1)
if (C / "dmg_probe.pt").exists():
    dmg = torch.load(C / "dmg_probe.pt")
else:
    dmg = surgery.damage_curves(base, stats, probe); torch.save(dmg, C / "dmg_probe.pt")
print("damage curves (4x128, 9 ratios)", round(time.time() - t), flush=True)
torch.set_printoptions(precision=4, linewidth=200, sci_mode=False)
G = list(CURVE_GRID)
i3 = G.index(0.3)
cal = res.double() * (dmg[:, i3].double().clamp_min(0) / res[:, i3].double().clamp_min(1e-30))[:, None]
print("measured/calibrated at each grid ratio, per layer (median over layers):",
      [round(float((dmg[:, j].double() / cal[:, j].clamp_min(1e-12)).median()), 2) for j in range(len(G))])
json.dump(dict(grid=G, residual=res.tolist(), damage_probe=dmg.tolist()), open(C / "curves.json", "w"))
stored = json.load(open("/work/main/results/width.json"))["allocations"]


def two_point(lo, hi):
    a, b = G.index(lo), G.index(hi)
    r, d = res.double().clamp_min(1e-30), dmg.double().clamp_min(1e-9)
    p = (torch.log(d[:, b] / d[:, a]) / torch.log(r[:, b] / r[:, a])).clamp(0.5, 4)
    return d[:, a:a + 1] * (r / r[:, a:a + 1]) ** p[:, None]


def piecewise(points):  # measured at `points`, residual shape scaled between neighbouring measured points
    idx = [G.index(x) for x in points]
    out = torch.zeros_like(res, dtype=torch.float64)
    r, d = res.double().clamp_min(1e-30), dmg.double().clamp_min(0)
    for j in range(len(G)):
        k = min(range(len(idx)), key=lambda q: abs(idx[q] - j))
        out[:, j] = d[:, idx[k]] * r[:, j] / r[:, idx[k]]
    return out


models_ = {"calibrated@0.3 (current)": cal, "measured 4x128 (9 probes)": dmg.double(),
           "power fit 0.3/0.6": two_point(0.3, 0.6), "power fit 0.2/0.5": two_point(0.2, 0.5),
           "piecewise 0.2/0.5": piecewise([0.2, 0.5]), "piecewise 0.15/0.3/0.6": piecewise([0.15, 0.3, 0.6])}
only = sys.argv[1:]
results = {}
for name, curves in models_.items():
    if only and not any(o in name for o in only):
        continue
    for ratio in (0.1, 0.2, 0.4):
        alloc = surgery.allocate_from_curves(curves.float(), ratio)
        m = copy.deepcopy(base)
        surgery.prune_mlp(m, ratio, method="obs", stats=stats, allocation=alloc)
        s = evaluation.perplexity_spread(m, tok, val_docs, tokens_per_document=384, window=384)
        results[f"{name} {ratio}"] = s.ppl
        print(f"{name:32s} {ratio:.1f} val PPL {s.ppl:7.3f}  alloc " + " ".join(f"{100*v:.0f}" for v in alloc.values()), flush=True)
        del m
for ratio in (0.1, 0.2, 0.4):
    alloc = dict(enumerate(stored[f"{ratio} exact"]))
    m = copy.deepcopy(base)
    surgery.prune_mlp(m, ratio, method="obs", stats=stats, allocation=alloc)
    s = evaluation.perplexity_spread(m, tok, val_docs, tokens_per_document=384, window=384)
    print(f"{'stored exact allocation':32s} {ratio:.1f} val PPL {s.ppl:7.3f}", flush=True)
s = evaluation.perplexity_spread(base, tok, val_docs, tokens_per_document=384, window=384)
print("base val PPL", round(s.ppl, 3), "docs", len(val_docs))
