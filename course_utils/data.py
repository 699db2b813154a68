"""Text for calibration and evaluation, per profile, and calibration batches with attention masks.

Offline: the English Wikipedia excerpt shipped inside the ``gensim`` wheel (98 articles with
prose), split by article into a calibration pool (all but the last 10 articles) and a held-out
evaluation split (the last 10), plus the Lee news corpus (also in gensim) as a second domain.
Full: WikiText-2 (raw) from the Hugging Face Hub: train as the calibration pool, test as held-out.
Corpus text is read from the packages at run time and never committed.
"""

from __future__ import annotations

import bz2
import json
import os
import random
import re
import weakref
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch

from .profiles import Profile, cache_dir, get_profile

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
N_EVAL_ARTICLES = 10  # the last 10 prose articles are held out
MIN_WORDS = 20  # a paragraph with fewer words is not prose (captions, list items)
SPLITS = ("calibration", "evaluation", "news")
CORPUS_VERSION = 1  # bump when the cleaning rules change, so caches are rebuilt


def gensim_test_data() -> Path:
    """The folder of test data inside the gensim wheel."""
    try:
        import gensim
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError("the offline text needs gensim: pip install gensim (or run `make course`)") from exc
    return Path(gensim.__file__).parent / "test" / "test_data"


_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # bold/italic quotes
    (re.compile(r"\(\s*[,;]?\s*\)"), ""),  # parentheses emptied by template removal
    (re.compile(r"\s+([,.;:])"), r"\1"),  # space before punctuation
    (re.compile(r"\s{2,}"), " "),
]


def clean_paragraph(text: str) -> str:
    """Strip the wiki markup that ``filter_wiki`` leaves behind."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()


def is_prose(paragraph: str) -> bool:
    """Keep running text: enough words, no heading, list, table or template remains."""
    if paragraph[:1] in "=*#|{!:;<" or paragraph.startswith("Category:"):
        return False
    return len(paragraph.split()) >= MIN_WORDS and paragraph[-1] in ".!?\"'"


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(title, prose paragraphs) for every article of the gensim excerpt that has prose, in file order.

    Parsed once (~4 s) and kept as JSON in the cache afterwards.
    """
    cached = cache_dir() / f"wikipedia_paragraphs_v{CORPUS_VERSION}.json"
    if cached.exists():
        return tuple((title, tuple(paragraphs)) for title, paragraphs in json.loads(cached.read_text()))
    articles = _parse_wikipedia()
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(articles))
    os.replace(tmp, cached)
    return articles


def _parse_wikipedia() -> tuple[tuple[str, tuple[str, ...]], ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(gensim_test_data() / WIKI_FILE) as handle:
        for title, text, _page_id in extract_pages(handle):
            paragraphs = []
            for block in filter_wiki(text).split("\n\n"):
                paragraph = clean_paragraph(" ".join(block.split("\n")))
                if paragraph and is_prose(paragraph):
                    paragraphs.append(paragraph)
            if paragraphs:
                articles.append((title, tuple(paragraphs)))
    return tuple(articles)


@lru_cache(maxsize=1)
def news_documents() -> tuple[str, ...]:
    """The Lee news corpus (Australian news, one document per line) from gensim's test data."""
    lines = (gensim_test_data() / NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(line.strip() for line in lines if len(line.split()) >= MIN_WORDS)


def _wikitext(split: str) -> list[str]:
    from datasets import load_dataset

    hub_split = {"calibration": "train", "evaluation": "test"}[split]
    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]
    return [r.strip() for r in rows if len(r.split()) >= MIN_WORDS and not r.strip().startswith("=")]


def load_texts(split: str = "evaluation", profile: Profile | str | None = None) -> list[str]:
    """Paragraphs of one split: ``"calibration"`` (pool for scores), ``"evaluation"`` (held out) or ``"news"``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    profile = get_profile(profile)
    if split == "news":
        return list(news_documents())
    if not profile.offline:
        return _wikitext(split)
    articles = wikipedia_articles()
    chosen = articles[:-N_EVAL_ARTICLES] if split == "calibration" else articles[-N_EVAL_ARTICLES:]
    return [p for _title, paragraphs in chosen for p in paragraphs]


def load_documents(split: str = "evaluation", profile: Profile | str | None = None, n: int = N_EVAL_ARTICLES
                   ) -> list[list[str]]:
    """The split's text as separate documents (lists of paragraphs), for measurements spread over documents.

    Offline: one document per Wikipedia article of the split. Full profile (WikiText-2 has no article ids
    after cleaning): the paragraphs in ``n`` consecutive groups of equal size.
    """
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"documents exist for 'calibration' and 'evaluation'; got {split!r}")
    profile = get_profile(profile)
    if profile.offline:
        articles = wikipedia_articles()
        chosen = articles[:-N_EVAL_ARTICLES] if split == "calibration" else articles[-N_EVAL_ARTICLES:]
        return [list(paragraphs) for _title, paragraphs in chosen]
    paragraphs = _wikitext(split)
    size = max(1, len(paragraphs) // n)
    return [paragraphs[i * size:(i + 1) * size] for i in range(n)]


def article_titles(split: str = "evaluation") -> list[str]:
    """Titles of the offline articles in ``split`` (to show learners what the held-out text is)."""
    articles = wikipedia_articles()
    chosen = articles[:-N_EVAL_ARTICLES] if split == "calibration" else articles[-N_EVAL_ARTICLES:]
    return [title for title, _ in chosen]


def calibration_batches(tokenizer, texts: list[str], n_samples: int = 64, seq_len: int = 256,
                        batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Seeded sample of ``n_samples`` paragraphs, tokenised (right padding, truncation) into batches.

    Each batch is a dict with ``input_ids`` and ``attention_mask`` of shape (batch, seq); padding
    positions have mask 0 so statistics can exclude them.
    """
    if not texts:
        raise ValueError("calibration data is empty: pass a non-empty list of texts "
                         "(e.g. data.load_texts('calibration'))")
    if n_samples < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError("need n_samples >= 1, seq_len >= 2, batch_size >= 1; "
                         f"got {n_samples}, {seq_len}, {batch_size}")
    rng = random.Random(seed)
    chosen = rng.sample(texts, n_samples) if n_samples <= len(texts) else rng.choices(texts, k=n_samples)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, n_samples, batch_size):
        # right padding: real tokens first, so positions are those of an unpadded run
        enc = tokenizer(chosen[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=seq_len, padding_side="right")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {joined text: ids}
_STREAMS_PER_TOKENIZER = 8


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation token stream: texts joined by blank lines, no special tokens, cut to ``max_tokens``.

    The last few streams of each tokenizer are remembered: a lesson that evaluates twenty variants on the
    same held-out text tokenizes it once (about 0.3 s per call for the offline split on one core).
    """
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("texts is empty: pass a non-empty list of strings (e.g. data.load_texts('evaluation'))")
    joined = "\n\n".join(texts)
    try:
        seen = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no memory
        seen = {}
    ids = seen.get(joined)
    if ids is None:
        ids = tokenizer(joined, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if len(seen) >= _STREAMS_PER_TOKENIZER:
            seen.pop(next(iter(seen)))
        seen[joined] = ids
    return (ids[:max_tokens] if max_tokens else ids).clone()  # a copy: callers may change theirs



def token_windows(tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 4,
                  max_windows: int | None = None, seed: int | None = 0) -> list[dict[str, torch.Tensor]]:
    """The texts as one token stream cut into full ``seq_len`` windows, shuffled (``seed``), in batches.

    Training data for recovery runs: no padding, so every position predicts a real token. Each batch is
    a dict with ``input_ids`` and an all-ones ``attention_mask`` of shape (batch, seq_len).
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1; got {seq_len}, {batch_size}")
    ids = token_stream(tokenizer, texts)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the texts give {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)  # (n_windows, seq_len)
    if seed is not None:
        windows = windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    if max_windows is not None:
        windows = windows[:max_windows]
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def to_device(batch, model):
    """``batch`` moved to where ``model``'s first parameter lives (CPU, a Colab GPU, ...).

    A dict (or a tokenizer's ``BatchEncoding``) gets its tensors moved and comes back as a dict; a tensor (token ids)
    comes back moved. The one way a lesson's inputs reach its model, so every notebook runs unchanged on a GPU.
    """
    device = next(model.parameters()).device
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def require_batches(batches: list[dict] | None, what: str, model=None) -> list[dict]:
    """Return ``batches`` if they are usable calibration batches, else raise a ``ValueError`` naming the fix.

    Checked: a non-empty list of dicts with 2-D integer ``input_ids``; an ``attention_mask`` of the same
    shape where every row has at least one real token; with ``model``, every id inside its vocabulary
    (ids from another model's tokenizer would otherwise fail deep inside torch, or silently read the
    wrong embeddings).
    """
    fix = "pass calibration=data.calibration_batches(tokenizer, texts) made with this model's tokenizer"
    if not batches:
        raise ValueError(f"{what} needs calibration data: {fix}")
    if isinstance(batches, dict):
        raise ValueError(f"{what} takes a list of batches, got one dict: wrap it in a list ([batch])")
    vocab = model.get_input_embeddings().num_embeddings if model is not None else None
    for number, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"{what}: batch {number} needs 2-D integer input_ids (batch, seq); {fix}")
        mask = batch.get("attention_mask")
        if mask is not None:
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(f"{what}: batch {number} has attention_mask {tuple(mask.shape)} but input_ids "
                                 f"{tuple(ids.shape)}; they must match")
            empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"{what}: batch {number} has rows {empty} whose attention_mask is all zeros "
                                 "(no real token to learn from); drop empty texts before batching")
        if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{what}: batch {number} has token ids in [{int(ids.min())}, {int(ids.max())}] but the "
                             f"model's vocabulary has {vocab} entries: were the batches made with another model's "
                             f"tokenizer? {fix}")
    return batches


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write rows as JSON lines (used for the generated evaluation tasks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Prompts cut from paragraphs (lesson 06's router)
# ---------------------------------------------------------------------------------------------

PROMPT_LENGTHS = (8, 16, 32, 64, 128)  # prompt lengths in words: from a short question to a paragraph


def cut_prompts(paragraphs: list[str], n: int, seed: int,
                lengths: Iterable[int] = PROMPT_LENGTHS) -> list[tuple[str, str]]:
    """``n`` (prompt, rest) pairs of varied complexity: seeded paragraphs cut after a seeded number of words.

    ``rest`` starts with a space, so prompt + rest is the paragraph's text (whitespace normalised).
    """
    lengths = tuple(lengths)
    if not 0 < n <= len(paragraphs):
        raise ValueError(f"n must be in [1, {len(paragraphs)}] (the number of paragraphs given); got {n}")
    rng = random.Random(seed)
    return [_cut(paragraph, rng.choice(lengths)) for paragraph in rng.sample(paragraphs, n)]


def cut_every_length(paragraphs: list[str], lengths: Iterable[int] = PROMPT_LENGTHS) -> list[tuple[str, str]]:
    """Every paragraph cut after each of ``lengths`` words: (prompt, rest) pairs, paragraph by paragraph.

    Pair ``i`` comes from paragraph ``i // len(lengths)`` (pass that as ``groups`` to
    ``bypass.AdaptiveBypass.calibrate``).
    Each paragraph needs more words than the longest cut, so that every prompt has a continuation.
    """
    lengths = tuple(lengths)
    short = [i for i, p in enumerate(paragraphs) if len(p.split()) <= max(lengths)]
    if not lengths or short:
        raise ValueError(f"every paragraph needs more than {max(lengths, default=0)} words (paragraphs {short[:5]} "
                         "have fewer): filter them, e.g. len(p.split()) >= 170")
    return [_cut(paragraph, k) for paragraph in paragraphs for k in lengths]


def _cut(paragraph: str, k: int) -> tuple[str, str]:
    words = paragraph.split()
    return " ".join(words[:k]), " " + " ".join(words[k:])
