import torch, glob, math, sys
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
d = sorted(glob.glob('/root/.cache/course_utils/standin_samples_p16_n240_k32_b128*'))[0]
c = torch.load(d + '/0019.pt')
ids = c['ids'].long()
def ppl(m):
    nll = []
    with torch.no_grad():
        for i in range(0, len(ids), 8):
            nll.append(F.cross_entropy(m(input_ids=ids[i:i+8]).logits[:, 15:-1].float().transpose(1, 2), ids[i:i+8, 16:]))
    return math.exp(torch.stack(nll).mean().item())
print("old stand-in", ppl(GPT2LMHeadModel.from_pretrained(sys.argv[1]).float().eval()))
# the teacher's entropy on its own samples, from the recorded top-32 (a lower bound on its PPL of them)
lp = c['logp'].float()
print("teacher top-32 mass", lp.exp().sum(-1).mean().item())
