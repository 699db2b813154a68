"""The offline corpus: stable article split, prose only, padded calibration batches."""

import pytest
import torch
from transformers import AutoTokenizer

from course_utils import data
from course_utils.models import smollm2_dir


def test_split_is_stable_and_disjoint():
    calibration, evaluation = data.load_texts("calibration"), data.load_texts("evaluation")
    assert len(data.wikipedia_articles()) == 98
    assert len(data.article_titles("evaluation")) == data.N_EVAL_ARTICLES
    assert data.article_titles("evaluation")[0] == "Azerbaijan"
    assert len(calibration) > 3000 and len(evaluation) > 400
    assert not set(calibration) & set(evaluation)
    assert all(len(p.split()) >= data.MIN_WORDS for p in evaluation)
    assert not any("''" in p or p.startswith("==") for p in calibration)


def test_news_domain():
    news = data.load_texts("news")
    assert len(news) >= 200 and "Sydney" in " ".join(news[:20])


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'train'"):
        data.load_texts("train")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir())


def test_calibration_batches_are_seeded_and_masked(tokenizer):
    texts = data.load_texts("calibration")
    a = data.calibration_batches(tokenizer, texts, n_samples=6, seq_len=32, batch_size=4, seed=1)
    b = data.calibration_batches(tokenizer, texts, n_samples=6, seq_len=32, batch_size=4, seed=1)
    c = data.calibration_batches(tokenizer, texts, n_samples=6, seq_len=32, batch_size=4, seed=2)
    assert [x["input_ids"].shape[0] for x in a] == [4, 2]
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b, strict=True))
    assert not (a[0]["input_ids"].shape == c[0]["input_ids"].shape and (a[0]["input_ids"] == c[0]["input_ids"]).all())
    assert a[0]["input_ids"].shape[1] <= 32
    short = data.calibration_batches(tokenizer, ["One two three four five six.", "Short."], n_samples=2, seq_len=32)
    mask = short[0]["attention_mask"]
    assert mask[:, 0].all() and not mask.all()  # right padding: real tokens first
    assert (mask.sum(1) > 0).all()


def test_empty_calibration_data(tokenizer):
    with pytest.raises(ValueError, match="calibration data is empty"):
        data.calibration_batches(tokenizer, [])


def test_token_windows_are_full_unpadded_and_seeded():
    texts = ["alpha beta gamma delta " * 40, "epsilon zeta eta theta " * 40]

    class CharTok:  # one token per character: enough to check the cutting
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    batches = data.token_windows(CharTok(), texts, seq_len=16, batch_size=3, seed=0)
    ids = torch.cat([b["input_ids"] for b in batches])
    n_chars = len("\n\n".join(texts))
    assert ids.shape == (n_chars // 16, 16)
    assert all(b["attention_mask"].eq(1).all() for b in batches)
    again = torch.cat([b["input_ids"] for b in data.token_windows(CharTok(), texts, seq_len=16, batch_size=3, seed=0)])
    assert torch.equal(ids, again)
    assert len(data.token_windows(CharTok(), texts, seq_len=16, max_windows=5, batch_size=2)) == 3
    with pytest.raises(ValueError, match="fewer than one window"):
        data.token_windows(CharTok(), ["short"], seq_len=64)


def test_to_device_moves_dicts_encodings_and_tensors_to_the_models_device():
    model = torch.nn.Linear(2, 2).to(torch.float64)  # "device" here: where its first parameter lives
    meta = torch.nn.Linear(2, 2, device="meta")
    ids = torch.tensor([[1, 2, 3]])
    assert data.to_device(ids, meta).device.type == "meta"
    moved = data.to_device({"input_ids": ids, "note": "kept"}, meta)
    assert moved["input_ids"].device.type == "meta" and moved["note"] == "kept"
    from transformers import BatchEncoding

    encoding = data.to_device(BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), meta)
    assert set(encoding) == {"input_ids", "attention_mask"} and encoding["attention_mask"].device.type == "meta"
    same = data.to_device(ids, model)  # already there: the very tensor back, nothing copied
    assert same is ids


def test_load_documents_are_the_held_out_articles_in_order():
    documents = data.load_documents("evaluation", "offline")
    assert len(documents) == data.N_EVAL_ARTICLES and all(documents)
    assert [p for doc in documents for p in doc] == data.load_texts("evaluation", "offline")
    with pytest.raises(ValueError, match="documents exist"):
        data.load_documents("news", "offline")


def test_token_stream_remembers_a_stream_and_hands_out_copies():
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    texts = data.load_texts("evaluation")[:20]
    direct = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    first = data.token_stream(tokenizer, texts, max_tokens=300)
    assert torch.equal(first, direct[:300])
    first.zero_()  # a caller changing its copy must not change the next caller's stream
    assert torch.equal(data.token_stream(tokenizer, texts), direct)
    five = tokenizer("\n\n".join(texts[:5]), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert torch.equal(data.token_stream(tokenizer, texts[:5]), five)
