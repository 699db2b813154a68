import copy, torch, json, time
import course_utils
from course_utils import data, evaluation, models, sparsity
profile = course_utils.setup(verbose=False)
model, tok = models.load_model("llama", profile)
cal = data.calibration_batches(tok, data.load_texts("calibration", profile), n_samples=16, seq_len=128, seed=0)
docs = data.load_documents("evaluation", profile)
val_docs = None
scores = sparsity.wanda_scores(model, cal)
layers = sparsity.projections_by_layer(model)
def owl_ratios(M, lam, S=0.5):
    D=[]
    for layer in layers:
        s=torch.cat([scores[n].flatten() for n in layer])
        D.append(float((s > M*s.mean()).float().mean()))
    D=torch.tensor(D)
    r=(D-D.min())/(D.max()-D.min())*lam*2
    r=r-r.mean()+(1-S)
    return (1-r).tolist(), D.tolist()
def masks_for(spars):
    masks={}
    for layer, sp in zip(layers, spars):
        masks.update(sparsity.masks_from_scores({n: scores[n] for n in layer}, sp, "row"))
    return masks
def ev(masks, n=1638):
    m=sparsity.apply_masks(copy.deepcopy(model), masks)
    sp=evaluation.perplexity_spread(m, tok, docs, tokens_per_document=n)
    return sp, sparsity.sparsity_of(m)
t=time.time()
uni, s0 = ev(masks_for([0.5]*len(layers)))
print('uniform', round(uni.ppl,2), round(s0,4), time.time()-t, flush=True)
for M, lam in ((5,0.08),(5,0.05),(7,0.08)):
    spars, D = owl_ratios(M, lam)
    sp, s1 = ev(masks_for(spars))
    d, se = sp.difference(uni)
    print('owl', M, lam, round(sp.ppl,2), round(s1,4), f"{d:+.3f}+/-{se:.3f}", [round(x,3) for x in spars[:6]], flush=True)
