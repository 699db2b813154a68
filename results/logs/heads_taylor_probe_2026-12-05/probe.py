"""Issue 17: why the course's Taylor ranking of query heads (within a K/V group) does no better than random draws.

Scores every query head of SmolLM2 five ways on the same 8 x 256 calibration tokens as the benchmark:
- batch |sum|: the course's importance.head_scores("taylor"): |sum over the head's W_o columns of grad x weight|
  per batch of 8 sequences, summed over batches (the signed sum is the gradient of a gate on the head's output);
- sequence |gate|: the same gate gradient per sequence, absolute value, summed (Michel et al. 2019's E_x |dL/dxi|);
- sequence fisher: the gate gradient per sequence squared, summed (a Fisher / second-order estimate);
- elementwise: sum over the head's W_o columns of |grad x weight| (Torch-Pruning's local Taylor, o_proj only);
- elementwise q+o: the same over its q_proj rows too.
Removes the lowest-scoring query head of every K/V group in every layer (90 heads, as the benchmark's "gqa"
set-up) and scores PPL on validation documents (calibration-split articles, first 384 tokens of 12) and on the
held-out protocol of benchmarks/torch_pruning_heads.py (first 512 tokens of the 10 evaluation articles).
"""
import copy, json, random, time
import torch
import course_utils
from course_utils import arch, data, evaluation, heads, importance, models
from course_utils.data import to_device

torch.set_num_threads(2)
profile = course_utils.setup(verbose=False)
model, tok = models.load_model("llama", profile)
model.eval()
cal_texts = data.load_texts("calibration", profile)
calibration = data.calibration_batches(tok, cal_texts, n_samples=8, seq_len=256, seed=0)
chosen = set(random.Random(0).sample(cal_texts, 8))
val = [[p for p in d if p not in chosen] for d in random.Random(5).sample(data.load_documents("calibration", profile), 12)]
test = data.load_documents("evaluation", profile)
L = arch.num_layers(model)
parts0 = arch.attention_parts(model, 0)
H, hd, G = parts0.n_heads, parts0.head_dim, parts0.n_kv_heads
t = time.time()
course = importance.head_scores(model, "taylor", calibration)
print("course taylor", round(time.time() - t, 1), "s", flush=True)

scores = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("sequence |gate|", "sequence fisher", "elementwise", "elementwise q+o")}
gates = {}
def hook(i):
    def fn(module, args):
        x = args[0]
        g = gates[i]
        return (x * g.repeat_interleave(hd, dim=1)[:, None, :].to(x.dtype),)
    return fn
handles = [arch.attention_parts(model, i).o.register_forward_pre_hook(hook(i)) for i in range(L)]
params = [p for i in range(L) for p in (arch.attention_parts(model, i).o.weight, arch.attention_parts(model, i).q.weight)]
for p in params:
    p.requires_grad_(True)
t = time.time()
for batch in calibration:
    batch = to_device(batch, model)
    b = batch["input_ids"].shape[0]
    for i in range(L):
        gates[i] = torch.ones(b, H, requires_grad=True)
    for p in params:
        p.grad = None
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels, use_cache=False).loss.backward()
    for i in range(L):
        g = gates[i].grad.double()  # (b, H)
        scores["sequence |gate|"][i] += g.abs().sum(0)
        scores["sequence fisher"][i] += g.pow(2).sum(0)
        ap = arch.attention_parts(model, i)
        o = (ap.o.weight.grad * ap.o.weight).detach().abs().reshape(-1, H, hd).sum((0, 2)).double()
        q = (ap.q.weight.grad * ap.q.weight).detach().abs().reshape(H, hd, -1).sum((1, 2)).double()
        scores["elementwise"][i] += o
        scores["elementwise q+o"][i] += o + q
for h in handles:
    h.remove()
for p in params:
    p.requires_grad_(False); p.grad = None
print("gate/elementwise scores", round(time.time() - t, 1), "s", flush=True)
scores = {"batch |sum| (course)": course.double(), **scores}
# the gate gradient summed over the batch equals the course's inner sum: a check of the gate hook
out = {}
def sel_lowest(s):
    low = s.reshape(L, G, H // G).argmin(-1)
    return {i: sorted(g * (H // G) + int(low[i, g]) for g in range(G)) for i in range(L)}
def sel_random(seed):
    d = torch.randint(0, H // G, (L, G), generator=torch.Generator().manual_seed(seed))
    return {i: sorted(g * (H // G) + int(d[i, g]) for g in range(G)) for i in range(L)}
base_v = evaluation.perplexity_spread(model, tok, val, tokens_per_document=384, window=384).ppl
base_t = evaluation.perplexity_spread(model, tok, test, tokens_per_document=512).ppl
print(f"unpruned: val {base_v:.2f} test {base_t:.2f}", flush=True)
sels = {k: sel_lowest(v) for k, v in scores.items()}
sels.update({f"random seed {s}": sel_random(s) for s in range(5)})
for name, sel in sels.items():
    m = heads.remove_heads(copy.deepcopy(model), sel)
    v = evaluation.perplexity_spread(m, tok, val, tokens_per_document=384, window=384)
    te = evaluation.perplexity_spread(m, tok, test, tokens_per_document=512)
    out[name] = dict(val=v.ppl, test=te.ppl, test_nll=te.nll, removed=sel)
    print(f"{name:24s} val {v.ppl:8.2f}  test {te.ppl:8.2f}", flush=True)
    del m
# how often do two scores pick the same head in a group
names = list(scores)
agree = {f"{a} / {b}": sum(sels[a][i] == sels[b][i] for i in range(L)) for a in names for b in names if a < b}
print("layers where the two picks are identical (of 30):", json.dumps(agree, indent=0))
corr = {}
for name, s in scores.items():
    c = torch.corrcoef(torch.stack([s.flatten().log(), scores["batch |sum| (course)"].flatten().log()]))[0, 1]
    corr[name] = float(c)
print("log-score correlation with the course's:", {k: round(v, 2) for k, v in corr.items()})
json.dump(dict(results=out, agree=agree, scores={k: v.tolist() for k, v in scores.items()}, base_val=base_v, base_test=base_t),
          open("/work/main/results/logs/heads_taylor_probe_2026-12-05/result.json", "w"), indent=1)
