"""Issue 19 exploration, part 2: damage curves in nats with no probe at all, from a Fisher-weighted refit residual.

Second order, K-FAC style: removing neurons leaves an error E (hidden x width+1) in a layer's output projection;
with g~_t the gradient of the summed token loss at the layer's output (the residual stream after layer l) and
x_t the MLP activations (plus 1), the mean loss rises by about 1/2 * mean_t (g~_t' E x_t)^2 ~ 1/2 tr(G E H E')
with G = mean_t g~ g~' (hidden x hidden) and H = mean_t x x' (the Gram statistics). The residual curves are
the case G = I; here OBS runs on G^(1/2) W instead of W (the same refit, a G-weighted choice and residual), so
each layer's whole curve comes out in nats. Compared with the curves measured on the fast probe (4 x 128 at 9
ratios) and as allocations on the validation set of probe.py.
"""
import copy, json, random, sys, time
from pathlib import Path
import torch
import course_utils
from course_utils import arch, data, evaluation, models, surgery
from course_utils.allocation import CURVE_GRID, kept_width
from course_utils.data import to_device
from course_utils.refit import _obs_problem, obs_remove

torch.set_num_threads(2)
C = Path("/tmp/w19")
profile = course_utils.setup(verbose=False)
base, tok = models.load_model("llama", profile)
cal_texts = data.load_texts("calibration", profile)
fit_chosen = set(random.Random(0).sample(cal_texts, 64))
fit = data.calibration_batches(tok, cal_texts, n_samples=64, seq_len=256, seed=0)
docs = data.load_documents("calibration", profile)
val_docs = [[p for p in d if p not in fit_chosen] for d in random.Random(5).sample(docs, 12)]
stats = torch.load(C / "stats64.pt", weights_only=False)
res, dmg = torch.load(C / "res64.pt"), torch.load(C / "dmg_probe.pt")
L = arch.num_layers(base)
N_BATCH = int(sys.argv[1]) if len(sys.argv) > 1 else 2
SAMPLED = len(sys.argv) > 2 and sys.argv[2] == "sampled"  # the true Fisher: labels drawn from the model itself
N_BATCH_TAG = f"{N_BATCH}{'s' if SAMPLED else ''}"
gfile = C / f"G_{N_BATCH_TAG}.pt"
t = time.time()
if gfile.exists():
    Gm = torch.load(gfile)
else:
    hidden = base.config.hidden_size
    Gm = torch.zeros(L, hidden, hidden, dtype=torch.float64)
    count = 0
    outs = {}
    def hook(i):
        def fn(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h.retain_grad(); outs[i] = h
        return fn
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(arch.decoder_layers(base))]
    for p in base.parameters():
        p.requires_grad_(False)
    base.get_input_embeddings().weight.requires_grad_(True)  # so the graph reaches every layer
    for batch in fit[:N_BATCH]:
        batch = to_device(batch, base)
        mask = batch["attention_mask"]
        labels = batch["input_ids"].masked_fill(mask == 0, -100)
        out = base(**batch, use_cache=False)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
        tgt = labels[:, 1:]
        if SAMPLED:
            drawn = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=torch.Generator().manual_seed(count))
            tgt = drawn.reshape(tgt.shape).masked_fill(tgt == -100, -100)
        nll = -logp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0] * (tgt != -100)
        nll.sum().backward()
        m = mask.bool()
        for i in range(L):
            g = outs[i].grad[m].double()  # (tokens, hidden)
            Gm[i] += g.T @ g
        count += int(m.sum())
        base.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    base.get_input_embeddings().weight.requires_grad_(False)
    Gm /= count
    torch.save(Gm, gfile)
print(f"G from {N_BATCH_TAG} batches: {time.time() - t:.0f} s", flush=True)
G = list(CURVE_GRID)
t = time.time()
fisher = torch.zeros(L, len(G), dtype=torch.float64)
for i in range(L):
    evals, evecs = torch.linalg.eigh(Gm[i])
    root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    full, inverse, width = _obs_problem(base, i, stats[i], 1e-3)
    full = root @ full
    widths = [kept_width(width, r) for r in G]
    losses = {width: 0.0}
    obs_remove(full, inverse, width, widths[-1], 32, stops=widths, losses=losses)
    fisher[i] = torch.tensor([0.5 * losses[n] for n in widths])
print(f"fisher curves: {time.time() - t:.0f} s", flush=True)
torch.set_printoptions(precision=3, linewidth=220, sci_mode=False)
d = dmg.double()
print("per grid ratio, median over layers of measured / fisher:",
      [round(float((d[:, j] / fisher[:, j]).median()), 2) for j in range(len(G))])
print("per grid ratio, rank correlation across layers (fisher vs measured; residual vs measured):")
def rank(x):
    return x.argsort().argsort().double()
for j in range(len(G)):
    a = torch.corrcoef(torch.stack([rank(fisher[:, j]), rank(d[:, j])]))[0, 1]
    b = torch.corrcoef(torch.stack([rank(res[:, j].double()), rank(d[:, j])]))[0, 1]
    print(f"  {G[j]:.2f}: fisher {a:.2f}  residual {b:.2f}")
print("layer 6, 12, 15, 18 at 0.3 / 0.75: measured", d[[6, 12, 15, 18]][:, [4, 8]].tolist(),
      "fisher", fisher[[6, 12, 15, 18]][:, [4, 8]].tolist())
json.dump(dict(fisher=fisher.tolist()), open(C / f"fisher_{N_BATCH_TAG}.json", "w"))
# allocations
i3 = G.index(0.3)
print("sum over layers at 0.3, measured / fisher:", round(float(d[:, i3].clamp_min(0).sum() / fisher[:, i3].sum()), 3))
cands = {"fisher (no probe)": fisher}  # a global constant would not change the allocation
for name, curves in cands.items():
    for ratio in (0.1, 0.2, 0.4):
        alloc = surgery.allocate_from_curves(curves.float(), ratio)
        m = copy.deepcopy(base)
        surgery.prune_mlp(m, ratio, method="obs", stats=stats, allocation=alloc)
        s = evaluation.perplexity_spread(m, tok, val_docs, tokens_per_document=384, window=384)
        print(f"{name:30s} {ratio:.1f} val PPL {s.ppl:7.3f}  alloc " + " ".join(f"{100*v:.0f}" for v in alloc.values()), flush=True)
        del m
