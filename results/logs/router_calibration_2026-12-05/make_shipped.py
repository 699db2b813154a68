"""Make data/adaptive_bypass_smollm2.json: exactly lesson 06's RECALIBRATE call (run from the repository root).

The tolerance is chosen on the calibration table itself (no held-out text): among tolerances 0.05 to 0.60 in steps
of 0.01, the longest run over which the bands get different plans, one plan throughout, and both halves of the
calibration (alternate paragraphs) give that plan (``RouterCalibration.widest_parted_run``); its middle.
(The first version of this file took the smallest such tolerance, 0.33: a single point, where one half agreed by
0.005 nats/token.) The standard errors are clustered by paragraph.
"""
import sys
import time
from pathlib import Path

import course_utils
from course_utils import bypass, data, models

profile = course_utils.setup("offline", verbose=False)
model, tokenizer = models.load_model("llama", profile)
shipped = Path("data/adaptive_bypass_smollm2.json")
order = bypass.RouterCalibration.load(shipped).order  # lesson 05's iterative order (checked in lesson 06)
long_paragraphs = [p for p in data.load_texts("calibration", profile) if len(p.split()) >= 170]
pairs = bypass.cut_every_length(long_paragraphs)
groups = [i // len(bypass.PROMPT_LENGTHS) for i in range(len(pairs))]
start = time.time()
router = bypass.AdaptiveBypass.calibrate(model, tokenizer, [p for p, _ in pairs], order, n_bands=3, tolerance=0.2,
                                         skip_grid=range(0, 13, 2), model_name=profile.model_id("llama"),
                                         continuations=[r for _, r in pairs], groups=groups)
cal = router.calibration
print(f"{len(pairs)} prompts, {time.time() - start:.0f} s; per band {cal.prompts_per_band}", flush=True)
run = cal.widest_parted_run([t / 100 for t in range(5, 61)])
print("widest run of tolerances where the bands part and both halves agree:", run)
cal = cal.with_tolerance(run[len(run) // 2])
for b in cal.measured:
    print(b, cal.measured[b], cal.measured_se[b])
print("tolerance", cal.tolerance, "skip per band", cal.skip_per_band)
if "--write" in sys.argv:
    cal.save(shipped)
    print("wrote", shipped)
