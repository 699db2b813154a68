"""The offline corpus: stable article split, prose only, padded calibration batches."""

import pytest
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
