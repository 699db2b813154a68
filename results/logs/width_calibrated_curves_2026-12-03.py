import copy, json, time, torch
import course_utils
from course_utils import data, evaluation, importance, models, surgery
profile = course_utils.setup(verbose=False)
base, tok = models.load_model("llama", profile)
texts = data.load_texts("calibration", profile)
held = data.load_texts("evaluation", profile)
cal = data.calibration_batches(tok, texts, n_samples=32, seq_len=256, seed=0)
probe = data.calibration_batches(tok, texts, n_samples=4, seq_len=128, seed=1)
out = {}
t = time.perf_counter(); stats = importance.collect_stats(base, cal, gram=True); out["stats_s"] = time.perf_counter() - t
t = time.perf_counter(); measured = surgery.damage_curves(base, stats, probe); out["damage_curves_s"] = time.perf_counter() - t
t = time.perf_counter(); calibrated, residuals = surgery.calibrated_curves(base, stats, probe, probe_ratio=0.3); out["calibrated_s"] = time.perf_counter() - t
print(out, flush=True)
grid = list(surgery.CURVE_GRID)
def rank(x): return x.argsort().argsort().double()
out["spearman_by_ratio"] = {g: float(torch.corrcoef(torch.stack([rank(measured[:, j]), rank(calibrated[:, j])]))[0, 1]) for j, g in enumerate(grid)}
out["base_ppl"] = evaluation.perplexity(base, tok, held, max_tokens=4096)
print(out, flush=True)
for ratio in (0.2, 0.4):
    for name, alloc in (("uniform", None), ("measured curves", surgery.allocate_from_curves(measured, ratio)),
                        ("calibrated residual curves", surgery.allocate_from_curves(calibrated, ratio))):
        m = copy.deepcopy(base)
        kw = dict(allocation=alloc) if alloc else {}
        surgery.prune_mlp(m, ratio, method="obs", stats=stats, **kw)
        ppl = evaluation.perplexity(m, tok, held, max_tokens=4096)
        out[f"{ratio} {name}"] = dict(ppl=ppl, params=models.count_parameters(m), ratios=[round(v, 3) for v in (alloc or {}).values()])
        print(ratio, name, ppl, models.count_parameters(m), flush=True)
        del m
json.dump(out, open("/tmp/alloc_cmp.json", "w"), indent=1)
print("done")
