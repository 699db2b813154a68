"""How stable is lesson 06's router calibration table with 36 vs more prompts? (calibration text only)"""
import json, time, sys
from pathlib import Path
import torch
import course_utils
from course_utils import bypass, data, models
profile = course_utils.setup("offline", verbose=False)
model, tok = models.load_model("llama", profile)
shipped = bypass.RouterCalibration.load(Path("data/adaptive_bypass_smollm2.json"))
order = shipped.order
long_p = [p for p in data.load_texts("calibration", profile) if len(p.split()) >= 170]
print("long paragraphs:", len(long_p), flush=True)
out = {}
for n, seed in [(36, 0), (36, 1), (36, 2), (min(120, len(long_p)), 0), (min(120, len(long_p)), 1)]:
    t = time.time()
    prompts = [p for p, _ in bypass.cut_prompts(long_p, n, seed=seed)]
    r = bypass.AdaptiveBypass.calibrate(model, tok, prompts, order, n_bands=3, tolerance=0.2,
                                        skip_grid=range(0, 13, 2), model_name=profile.model_id("llama"))
    c = r.calibration
    out[f"{n}_{seed}"] = dict(measured=c.measured, skips=c.skip_per_band, sec=time.time() - t)
    print(n, seed, round(time.time() - t), c.skip_per_band, flush=True)
    for b, row in c.measured.items():
        print("  ", b, row, flush=True)
json.dump(out, open("/tmp/cal06/probe.json", "w"), indent=1)
