"""How every notebook measures a model: perplexity, last-word accuracy, lm-eval, generation, latency.

Perplexity protocol (what every notebook reports): the texts are joined with blank lines and
tokenised once without special tokens; the token stream (cut to ``max_tokens`` when a budget is
set) is split into consecutive, non-overlapping windows of ``window`` tokens; each window is
scored on its own (no context carried across windows), every token but the first of a window is
predicted, and PPL = exp(total negative log-likelihood / number of predicted tokens). The same
text, window and budget give the same number for any model sharing the tokenizer.

Last-word accuracy (LAMBADA-style): items are built by code from the held-out paragraphs: the
context is a paragraph up to the final word of one of its sentences, the target is that word,
and only words that already occur in the context are kept (the passage holds the answer). An item
counts as correct when greedy decoding reproduces every token of the target (lm-eval's
``is_greedy``).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import arch
from .anatomy import count_parameters
from .data import load_texts, require_batches, to_device, token_stream, write_jsonl
from .profiles import Profile, cache_dir, get_profile

LASTWORD_VERSION = 2  # bump when the item rules change, so cached task files are rebuilt
MIN_CONTEXT_WORDS = 30  # shorter contexts rarely determine the word
MAX_CONTEXT_WORDS = 60  # longer contexts are cut to their last 60 words (keeps items cheap on a CPU)
FULL_LM_EVAL_TASKS = ("lambada_openai", "boolq", "arc_easy", "wikitext")
OFFLINE_LM_EVAL_TASKS = ("course_lastword", "course_wikipedia")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], window: int = 512,
               max_tokens: int | None = None, batch_size: int | None = None) -> float:
    """Perplexity over fixed non-overlapping windows (see the module docstring for the protocol).

    ``batch_size`` windows go through the model at once; by default 4 on a GPU and 1 on a CPU, where
    one window at a time measured faster (SmolLM2-135M, 4,096 tokens on one core: 16.6 s against 20.8 s
    in batches of 4, the same perplexity). The batch size changes only the speed, never the number.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens (one to condition on, one to predict); got {window}")
    ids = token_stream(tokenizer, texts, max_tokens)
    if ids.numel() < 2:
        raise ValueError("the texts give fewer than 2 tokens; nothing to predict")
    device = _device_of(model)
    if batch_size is None:
        batch_size = 4 if device.type == "cuda" else 1
    n_full = ids.numel() // window
    windows = [ids[i * window:(i + 1) * window] for i in range(n_full)]
    tail = ids[n_full * window:]
    total_nll, total_count = 0.0, 0
    groups = [torch.stack(windows[i:i + batch_size]) for i in range(0, n_full, batch_size)]
    if tail.numel() >= 2:
        groups.append(tail.unsqueeze(0))
    for batch in groups:  # (batch, window)
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (batch, window - 1, vocab)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_count += batch[:, 1:].numel()
    return math.exp(total_nll / total_count)


@dataclass
class PerplexitySpread:
    """Perplexity with the budget spread over documents, and how much it varies between them."""

    ppl: float  # exp(mean NLL over every predicted token)
    per_document: list[float]  # each document's perplexity
    nll: list[float]  # each document's mean NLL (nats per token)
    tokens: list[int]  # predicted tokens per document

    @property
    def se_log_ppl(self) -> float:
        """Standard error of the mean log-PPL over documents (documents weighted equally)."""
        n = len(self.nll)
        return statistics.stdev(self.nll) / math.sqrt(n) if n > 1 else float("nan")

    def difference(self, other: PerplexitySpread) -> tuple[float, float]:
        """(mean log-PPL difference self - other over the same documents, its paired standard error)."""
        if len(self.nll) != len(other.nll):
            raise ValueError("compare spreads measured on the same documents")
        diffs = [a - b for a, b in zip(self.nll, other.nll, strict=True)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        return statistics.fmean(diffs), se


@torch.no_grad()
def perplexity_spread(model: nn.Module, tokenizer, documents: list[list[str]], tokens_per_document: int = 512,
                      window: int = 512) -> PerplexitySpread:
    """The first ``tokens_per_document`` tokens of every document (``data.load_documents``), scored as in
    ``perplexity``; one number overall and one per document, so a comparison can be read against the noise."""
    if not documents or any(not doc for doc in documents):
        raise ValueError("documents must be a non-empty list of non-empty paragraph lists (data.load_documents())")
    nll, tokens = [], []
    for doc in documents:
        ppl = perplexity(model, tokenizer, doc, window=window, max_tokens=tokens_per_document)
        count = token_stream(tokenizer, doc, tokens_per_document).numel()
        full, tail = divmod(count, window)  # as ``perplexity`` cuts it: a window's first token is not predicted
        predicted = full * (window - 1) + (tail - 1 if tail >= 2 else 0)
        nll.append(math.log(ppl))
        tokens.append(predicted)
    total = sum(n * t for n, t in zip(nll, tokens, strict=True)) / sum(tokens)
    return PerplexitySpread(ppl=math.exp(total), per_document=[math.exp(n) for n in nll], nll=nll, tokens=tokens)


_SENTENCE_END = re.compile(r"([A-Za-z]{3,})([.!?])(?=\s|$)")


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean next-token cross-entropy (nats/token) over padded batches; padding is never predicted."""
    require_batches(batches, "calibration_loss", model)
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, model)
        loss, tokens = next_token_loss(model(**batch, use_cache=False).logits, batch)
        total, count = total + loss, count + tokens
    return total / count


def next_token_loss(logits: torch.Tensor, batch: dict) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of predicted tokens) of ``logits`` for one padded batch."""
    mask = batch["attention_mask"][:, 1:].to(logits.device)
    targets = batch["input_ids"][:, 1:].to(logits.device).masked_fill(mask == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="sum").item()
    return loss, int((targets != -100).sum())


def build_lastword_items(texts: list[str], min_context_words: int = MIN_CONTEXT_WORDS,
                         max_context_words: int = MAX_CONTEXT_WORDS) -> list[dict]:
    """LAMBADA-style items from paragraphs: {"context", "target"} with the target word seen in the context."""
    items = []
    for paragraph in texts:
        for match in _SENTENCE_END.finditer(paragraph):
            words, word = paragraph[:match.start(1)].split(), match.group(1)
            if len(words) < min_context_words:
                continue
            context = " ".join(words[-max_context_words:])
            if re.search(rf"\b{re.escape(word)}\b", context):
                items.append({"context": context, "target": word})
    return items


def lastword_items(profile: Profile | str | None = None, n_items: int | None = None) -> list[dict]:
    """The held-out last-word items (generated at first use into the cache), first ``n_items`` of them."""
    path = lastword_file(profile)
    import json

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    profile = get_profile(profile)
    n_items = n_items if n_items is not None else profile.lastword_items
    return rows[:n_items] if n_items else rows


def lastword_file(profile: Profile | str | None = None) -> Path:
    """JSONL file of last-word items for the profile's held-out text; built from the corpus on first use."""
    profile = get_profile(profile)
    path = cache_dir() / "tasks" / f"lastword_{profile.name}_v{LASTWORD_VERSION}.jsonl"
    if not path.exists():
        import random

        items = build_lastword_items(load_texts("evaluation", profile))
        random.Random(0).shuffle(items)  # spread items over all held-out articles
        tmp = path.with_suffix(".tmp")
        write_jsonl(items, tmp)
        tmp.replace(path)
    return path


@torch.no_grad()
def last_word_accuracy(model: nn.Module, tokenizer, items: list[dict], batch_size: int = 8) -> float:
    """Share of items whose target tokens are all the greedy (argmax) prediction given the context."""
    if not items:
        raise ValueError("no last-word items: pass a non-empty list (e.g. evaluation.lastword_items())")
    device = _device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        seqs, spans = [], []
        for item in chunk:
            ctx = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
            tgt = tokenizer(" " + item["target"], add_special_tokens=False)["input_ids"]
            seqs.append(ctx + tgt)
            spans.append((len(ctx), len(ctx) + len(tgt)))
        length = max(map(len, seqs))
        input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(seqs):  # right padding: positions of real tokens do not move
            input_ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        # logits only where the target is predicted (token t at position t - 1); a shorter target repeats its last
        width = max(end - begin for begin, end in spans)
        at = torch.tensor([[begin - 1 + min(k, end - begin - 1) for k in range(width)] for begin, end in spans])
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=at.to(device)).logits  # (batch, width, vocab)
        for row, (begin, end) in enumerate(spans):
            predicted = logits[row, :end - begin].argmax(-1).cpu()
            correct += int(torch.equal(predicted, input_ids[row, begin:end]))
    return correct / len(items)


def offline_task_configs(profile: Profile | str | None = None) -> list[dict]:
    """lm-eval task configs for the offline profile, pointing at absolute paths of generated files."""
    profile = get_profile(profile)
    lastword = lastword_file(profile)
    n = profile.lastword_items
    if n:  # lm-eval reads the whole file: write the budgeted subset beside it
        subset = lastword.with_name(lastword.stem + f"_first{n}.jsonl")
        if not subset.exists():
            lines = lastword.read_text(encoding="utf-8").splitlines()[:n]
            subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
        lastword = subset
    wiki = cache_dir() / "tasks" / f"wikipedia_{profile.name}.jsonl"
    if not wiki.exists():
        write_jsonl([{"text": t} for t in load_texts("evaluation", profile)], wiki)
    return [
        {
            "task": "course_lastword",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(lastword.resolve())}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": " {{target}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        {
            "task": "course_wikipedia",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(wiki.resolve())}},
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
        },
    ]


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str] | None = None,
                profile: Profile | str | None = None, limit: int | None = None,
                batch_size: int = 8) -> dict[str, dict]:
    """Evaluate an in-memory model with lm-eval: the course's local tasks offline, standard tasks in full.

    Returns ``{task: {metric: value}}``. ``limit`` caps the documents per task (lm-eval's own option).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    profile = get_profile(profile)
    if profile.offline:
        configs = {c["task"]: c for c in offline_task_configs(profile)}
        names = list(tasks or configs)
        unknown = [t for t in names if t not in configs]
        if unknown:
            raise ValueError(f"offline lm-eval tasks are {sorted(configs)}; got {unknown} "
                             "(Hub tasks such as boolq need the full profile)")
        task_list: list = [configs[t] for t in names]
    else:
        task_list = list(tasks or FULL_LM_EVAL_TASKS)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notices about wrapping an in-memory model
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device_of(model)))
    output = simple_evaluate(model=lm, tasks=task_list, limit=limit, bootstrap_iters=0,
                             log_samples=False, verbosity="ERROR")
    results = {}
    for task, metrics in output["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    return results


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    enc = tokenizer(prompt, return_tensors="pt").to(_device_of(model))
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def forward_flops(model: nn.Module, tokens: int = 128) -> int:
    """FLOPs of one forward pass over ``tokens`` random tokens (batch 1), attention scores included.

    On a CPU ``torch.utils.flop_counter.FlopCounterMode`` does not see the fused attention kernel transformers uses
    by default (SDPA; on CUDA it counts SDPA's kernels), so the count is taken with eager attention, the same on
    every device, and the model's own setting is restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    default = getattr(model.config, "_attn_implementation", None)
    if default not in (None, "eager"):
        model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            model(ids.to(_device_of(model)), use_cache=False)
    finally:
        if default not in (None, "eager"):
            model.set_attn_implementation(default)
    return counter.get_total_flops()


@dataclass
class Latency:
    """Median timings over several runs after a warm-up."""

    prefill_ms: float  # one forward pass over the prompt (batch 1), logits for the last position only, as in generate
    decode_tok_s: float  # new tokens per second, one at a time with the KV cache
    prompt_tokens: int
    new_tokens: int
    runs: int
    prefill_ms_range: tuple[float, float] = (float("nan"), float("nan"))  # (fastest, slowest) run
    decode_tok_s_range: tuple[float, float] = (float("nan"), float("nan"))  # (slowest, fastest) run

    def __str__(self) -> str:
        return (f"prefill {self.prefill_ms:.0f} ms ({self.prefill_ms_range[0]:.0f}-{self.prefill_ms_range[1]:.0f}), "
                f"decode {self.decode_tok_s:.1f} tok/s ({self.decode_tok_s_range[0]:.1f}-"
                f"{self.decode_tok_s_range[1]:.1f}); median and range of {self.runs} runs")


@torch.no_grad()
def latency(model: nn.Module, tokenizer=None, prompt_tokens: int = 128, new_tokens: int = 32,
            runs: int = 5, warmup: int = 1) -> Latency:
    """Prefill time and KV-cache decode speed (median and range of ``runs`` after ``warmup`` runs)."""
    from transformers import DynamicCache

    device = _device_of(model)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab // 10, vocab, (1, prompt_tokens), generator=generator).to(device)  # (1, prompt)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    prefill, decode = [], []
    for run in range(warmup + runs):
        cache = DynamicCache(config=model.config)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, logits_to_keep=1, **arch.cache_kwargs(model, cache))  # as generate does
        sync()
        t1 = time.perf_counter()
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, **arch.cache_kwargs(model, cache))  # the cache grows in place
            token = out.logits[:, -1:].argmax(-1)
        sync()
        t2 = time.perf_counter()
        if run >= warmup:
            prefill.append(t1 - t0)
            decode.append(new_tokens / (t2 - t1))
    return Latency(prefill_ms=1000 * statistics.median(prefill), decode_tok_s=statistics.median(decode),
                   prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                   prefill_ms_range=(1000 * min(prefill), 1000 * max(prefill)),
                   decode_tok_s_range=(min(decode), max(decode)))


@dataclass
class EvalRow:
    """One model's line in a comparison table."""

    name: str
    params: int
    ppl: float
    lastword_acc: float
    prefill_ms: float | None = None
    decode_tok_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_model(model: nn.Module, tokenizer, name: str, profile: Profile | str | None = None,
                   texts: list[str] | None = None, speed: bool = True, window: int = 512,
                   max_tokens: int | None = -1, n_items: int | None = None) -> EvalRow:
    """Parameters, held-out PPL and last-word accuracy, and optionally speed.

    Budgets default to the profile's; ``max_tokens=None`` and ``n_items=0`` use the whole split.
    """
    profile = get_profile(profile)
    texts = texts if texts is not None else load_texts("evaluation", profile)
    row = EvalRow(
        name=name,
        params=count_parameters(model),
        ppl=perplexity(model, tokenizer, texts, window=window,
                       max_tokens=profile.eval_tokens if max_tokens == -1 else max_tokens),
        lastword_acc=last_word_accuracy(model, tokenizer, lastword_items(profile, n_items=n_items)),
    )
    if speed:
        timing = latency(model, tokenizer)
        row.prefill_ms, row.decode_tok_s = timing.prefill_ms, timing.decode_tok_s
    return row


def markdown_table(rows: list[EvalRow], base: str | None = None) -> str:
    """A comparison table; with ``base`` (a row name) adds parameter, PPL and speed ratios against it."""
    if not rows:
        raise ValueError("no rows to tabulate")
    ref = next((r for r in rows if r.name == base), None) if base else None
    if base and ref is None:
        raise ValueError(f"base row {base!r} not among {[r.name for r in rows]}")
    header = "| model | params (M) | PPL | last-word acc | prefill (ms) | decode (tok/s) |"
    if ref:
        header += " params vs base | PPL vs base | decode vs base |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        line = (f"| {r.name} | {r.params / 1e6:.1f} | {r.ppl:.2f} | {r.lastword_acc:.3f} | "
                f"{fmt(r.prefill_ms, '.1f')} | {fmt(r.decode_tok_s, '.1f')} |")
        if ref:
            decode = "-" if not (r.decode_tok_s and ref.decode_tok_s) else f"{r.decode_tok_s / ref.decode_tok_s:.2f}x"
            line += f" {r.params / ref.params:.2f}x | {r.ppl / ref.ppl:.2f}x | {decode} |"
        lines.append(line)
    return "\n".join(lines)
