"""Issue 17: a per-layer sparsity allocation from measured damage curves, against uniform Wanda, at 50 and 70 %.

Per layer l and sparsity s in GRID: Wanda's row masks applied to layer l's seven projections alone (weights
zeroed, then restored), the loss increase measured on a probe of 8 x 128 calibration tokens (hidden states
carried from layer to layer, so each probe runs layers l.. only). allocation.allocate_from_curves turns the
curves into per-layer sparsities with the target mean (every layer has the same number of weights in
SmolLM2, so the mean is the model's sparsity). Scored against uniform Wanda on validation (12 calibration
articles without the Wanda/probe paragraphs, 384 tokens each), then on the held-out protocol of lesson 11's
benchmark (10 evaluation articles), paired differences over documents.
"""
import copy, json, random, sys, time
import torch
import course_utils
from course_utils import allocation, arch, data, evaluation, models, sparsity, streams

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
profile = course_utils.setup(verbose=False)
model, tok = models.load_model("llama", profile)
texts = data.load_texts("calibration", profile)
cal = data.calibration_batches(tok, texts, n_samples=16, seq_len=128, seed=0)  # Wanda's (lesson 11's size)
probe = data.calibration_batches(tok, texts, n_samples=8, seq_len=128, seed=1)
used = set(random.Random(0).sample(texts, 16)) | set(random.Random(1).sample(texts, 8))
val = [[p for p in d if p not in used] for d in random.Random(5).sample(data.load_documents("calibration", profile), 12)]
test = data.load_documents("evaluation", profile)
scores = sparsity.wanda_scores(model, cal)
layers = sparsity.projections_by_layer(model)
mods = sparsity.linear_layers(model)
t = time.time()
captured = streams.layer_inputs(model, probe)
stream, args = [h for h, _ in captured], [k for _, k in captured]
curves = torch.zeros(len(layers), len(GRID))
with torch.no_grad():
    base = None
    for index, layer in enumerate(arch.decoder_layers(model)):
        names = list(layers[index])
        saved = {n: mods[n].weight.detach().clone() for n in names}
        for j, s in enumerate(GRID):
            masks = sparsity.masks_from_scores({n: scores[n] for n in names}, s, "row")
            for n in names:
                mods[n].weight.mul_(masks[n].to(mods[n].weight.dtype))
            curves[index, j] = streams.loss_from(model, index, stream, args, probe)
            for n in names:
                mods[n].weight.copy_(saved[n])
        stream = streams.run_layer(layer, stream, args)
    base = streams.loss_from(model, arch.num_layers(model), stream, args, probe)
curves -= base
print(f"damage curves: {time.time() - t:.0f} s", flush=True)
torch.set_printoptions(precision=3, linewidth=220, sci_mode=False)
print(curves)
json.dump(dict(grid=GRID, curves=curves.tolist()), open("/tmp/sparsity_curves.json", "w"))


def masks_for(spars):
    masks = {}
    for layer, sp in zip(layers, spars):
        masks.update(sparsity.masks_from_scores({n: scores[n] for n in layer}, sp, "row"))
    return masks


def ev(spars, docs, n):
    m = sparsity.apply_masks(copy.deepcopy(model), masks_for(spars))
    return evaluation.perplexity_spread(m, tok, docs, tokens_per_document=n, window=n), sparsity.sparsity_of(m)


for target in (0.5, 0.7):
    uni_v, s_u = ev([target] * len(layers), val, 384)
    alloc = allocation.allocate_from_curves(curves, target, grid=GRID, max_ratio=0.9)
    spars = [alloc[i] for i in range(len(layers))]
    al_v, s_a = ev(spars, val, 384)
    d, se = al_v.difference(uni_v)
    print(f"{target:.0%}: sparsity uniform {s_u:.4f} allocated {s_a:.4f}; validation PPL uniform {uni_v.ppl:.2f} "
          f"allocated {al_v.ppl:.2f} (allocated - uniform {d:+.3f} +/- {se:.3f} nats)", flush=True)
    print("   per-layer sparsity:", " ".join(f"{100 * x:.0f}" for x in spars), flush=True)
    uni_t, _ = ev([target] * len(layers), test, 200)
    al_t, _ = ev(spars, test, 200)
    d, se = al_t.difference(uni_t)
    print(f"   held-out (10 articles x 200 tokens): uniform {uni_t.ppl:.2f} allocated {al_t.ppl:.2f} "
          f"({d:+.3f} +/- {se:.3f} nats)", flush=True)
