"""Issue 19 exploration, part 3: Fisher (or residual) curve shapes scaled per layer by one probe at a high ratio,
where the probe's signal stands above its noise (at 30 % several layers read negative damage on 4 x 128 tokens).
Reads the cached statistics and curves of probe.py / fisher.py; allocations scored as there."""
import copy, json, random, sys
from pathlib import Path
import torch
import course_utils
from course_utils import data, evaluation, models, surgery
from course_utils.allocation import CURVE_GRID

torch.set_num_threads(2)
C = Path("/tmp/w19")
profile = course_utils.setup(verbose=False)
base, tok = models.load_model("llama", profile)
cal_texts = data.load_texts("calibration", profile)
fit_chosen = set(random.Random(0).sample(cal_texts, 64))
val_docs = [[p for p in d if p not in fit_chosen] for d in random.Random(5).sample(data.load_documents("calibration", profile), 12)]
stats = torch.load(C / "stats64.pt", weights_only=False)
res, dmg = torch.load(C / "res64.pt").double(), torch.load(C / "dmg_probe.pt").double()
fe = torch.tensor(json.load(open(C / "fisher_2.json"))["fisher"])
ft = torch.tensor(json.load(open(C / "fisher_2s.json"))["fisher"])
G = list(CURVE_GRID)
def at(shape, ratio):
    j = G.index(ratio)
    return shape * (dmg[:, j].clamp_min(0) / shape[:, j].clamp_min(1e-30))[:, None]
def smooth(shape, ratio, window=5):
    """shape x (probe / shape at `ratio`), the per-layer factor replaced by its running median over `window` layers."""
    j = G.index(ratio)
    f = dmg[:, j].clamp_min(0) / shape[:, j].clamp_min(1e-30)
    h = window // 2
    med = torch.stack([f[max(0, i - h):i + h + 1].median() for i in range(len(f))])
    return shape * med[:, None]
cands = {"true fisher x median5(probe@0.75)": smooth(ft, 0.75), "true fisher x median5(probe@0.3)": smooth(ft, 0.3),
         "residual x median5(probe@0.3)": smooth(res, 0.3), "residual x median5(probe@0.75)": smooth(res, 0.75),
         "true fisher x median9(probe@0.75)": smooth(ft, 0.75, 9),"true fisher x probe@0.75": at(ft, 0.75), "true fisher x probe@0.6": at(ft, 0.6),
         "residual x probe@0.75": at(res, 0.75), "emp fisher x probe@0.75": at(fe, 0.75)}
only = sys.argv[1:]
for name, curves in cands.items():
    if only and not any(o in name for o in only):
        continue
    for ratio in (0.1, 0.2, 0.4):
        alloc = surgery.allocate_from_curves(curves.float(), ratio)
        m = copy.deepcopy(base)
        surgery.prune_mlp(m, ratio, method="obs", stats=stats, allocation=alloc)
        s = evaluation.perplexity_spread(m, tok, val_docs, tokens_per_document=384, window=384)
        print(f"{name:30s} {ratio:.1f} val PPL {s.ppl:7.3f}  alloc " + " ".join(f"{100*v:.0f}" for v in alloc.values()), flush=True)
        del m
