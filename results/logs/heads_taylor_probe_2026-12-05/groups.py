"""Issue 17, part 2: whole K/V groups. The per-sequence gate gradient for a group is the sum of its query heads'
gate gradients; its absolute value (or square) per sequence is not the sum of the heads' per-sequence scores.
Compares, for model-wide removal of the 12 / 24 lowest groups (lesson 10's budgets, keeping one group per layer)
and for one group per layer (30, the benchmark's "groups" set-up): the course's batch |sum| (summed over the
group's heads), per-sequence |head gate| summed over the group, per-sequence |group gate|, per-sequence
(group gate)^2, and three random draws. PPL on validation (12 calibration articles without the 8 scoring
paragraphs, 384 tokens each) and held-out (10 evaluation articles, 512 tokens each)."""
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
p0 = arch.attention_parts(model, 0)
H, hd, G = p0.n_heads, p0.head_dim, p0.n_kv_heads
gates, per_seq = {}, {i: [] for i in range(L)}
def hook(i):
    def fn(module, args):
        return (args[0] * gates[i].repeat_interleave(hd, dim=1)[:, None, :].to(args[0].dtype),)
    return fn
handles = [arch.attention_parts(model, i).o.register_forward_pre_hook(hook(i)) for i in range(L)]
for batch in calibration:
    batch = to_device(batch, model)
    for i in range(L):
        gates[i] = torch.ones(batch["input_ids"].shape[0], H, requires_grad=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels, use_cache=False).loss.backward()
    for i in range(L):
        per_seq[i].append(gates[i].grad.double())
for h in handles:
    h.remove()
g = torch.stack([torch.cat(per_seq[i]) for i in range(L)])  # (L, sequences, H)
# the course's score before 2026-12-05: |gate gradient summed over each batch of 8|, summed over batches
course = torch.stack([sum(b.sum(0).abs() for b in per_seq[i]) for i in range(L)])
grp = g.reshape(L, g.shape[1], G, H // G).sum(-1)  # (L, sequences, G): the group gate's gradient
group_scores = {
    "batch |sum| (course)": course.reshape(L, G, H // G).sum(-1),
    "sum of heads' sequence |gate|": g.abs().sum(1).reshape(L, G, H // G).sum(-1),
    "sequence |group gate|": grp.abs().sum(1),
    "sequence (group gate)^2": grp.pow(2).sum(1),
}
out = {}
def score(name, sel):
    m = heads.remove_heads(copy.deepcopy(model), heads.group_heads(model, sel))
    v = evaluation.perplexity_spread(m, tok, val, tokens_per_document=384, window=384).ppl
    t = evaluation.perplexity_spread(m, tok, test, tokens_per_document=512).ppl
    out[name] = dict(val=v, test=t, removed=sel)
    print(f"{name:45s} val {v:8.2f}  test {t:8.2f}", flush=True)
for n in (12, 24, 30):
    for name, s in group_scores.items():
        sel = ({i: [int(s[i].argmin())] for i in range(L)} if n == 30 else importance.lowest_groups(model, s.float(), n))
        score(f"{n} groups: {name}", sel)
    for seed in range(3):
        if n == 30:
            d = torch.randint(0, G, (L,), generator=torch.Generator().manual_seed(seed))
            sel = {i: [int(d[i])] for i in range(L)}
        else:
            sel = importance.random_groups(model, n, seed)
        score(f"{n} groups: random seed {seed}", sel)
json.dump(out, open("/work/main/results/logs/heads_taylor_probe_2026-12-05/groups_result.json", "w"), indent=1)
