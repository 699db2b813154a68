"""The contrastive pairs of lessons 08-09: reproducible, minimal, and split by frame."""

import pytest

from course_utils import bias_pairs


def test_shipped_file_is_what_the_module_builds():
    assert bias_pairs.main(["--check"]) == 0
    assert bias_pairs.load() == bias_pairs.build()


def test_every_category_has_pairs_in_both_splits():
    rows = bias_pairs.load()
    assert set(bias_pairs.DEMOGRAPHIC) == {"gender", "race_ethnicity", "religion", "age", "nationality"}
    assert set(bias_pairs.CATEGORIES) == {*bias_pairs.DEMOGRAPHIC, "control"}
    assert len({row["id"] for row in rows}) == len(rows)  # ids are unique
    for split in bias_pairs.SPLITS:
        for category in bias_pairs.CATEGORIES:
            frames = {row["frame"] for row in bias_pairs.load(split, category)}
            assert len(frames) >= 8, (split, category)


def test_splits_share_no_frame():
    selection = {row["frame"] for row in bias_pairs.load("selection")}
    held_out = {row["frame"] for row in bias_pairs.load("held_out")}
    assert selection and held_out and not selection & held_out
    # no frame's fixed text is contained in a frame of the other split either
    for a in selection:
        for b in held_out:
            for part in a.split("{who}") + b.split("{who}"):
                part = part.strip(" ,")
                if len(part) > 12:
                    assert part not in a or part not in b, (a, b)


def test_the_two_prompts_differ_only_in_the_term():
    for row in bias_pairs.load():
        noun = bias_pairs.CATEGORIES[row["category"]][0]
        who = [term if noun is None else f"{term} {noun}" for term in row["terms"]]
        assert row["prompts"] == [row["frame"].format(who=w) for w in who]
        assert row["prompts"][0] != row["prompts"][1]
        start = row["frame"].index("{who}")
        for prompt, w in zip(row["prompts"], who, strict=True):
            assert prompt[:start] == row["frame"][:start] and prompt[start:start + len(w)] == w


def test_load_refuses_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        bias_pairs.load("train")
    with pytest.raises(ValueError, match="unknown category"):
        bias_pairs.load(category="height")
    with pytest.raises(FileNotFoundError, match="python -m course_utils.bias_pairs"):
        bias_pairs.load(path=tmp_path / "missing.jsonl")


def test_continuations_cover_every_held_out_frame_of_gender_and_age_only():
    held_out_frames = set(bias_pairs.FRAMES["held_out"])
    assert set(bias_pairs.CONTINUATIONS) == held_out_frames  # every held-out frame, no other
    for row in bias_pairs.load():
        has = "continuations" in row
        assert has == (row["split"] == "held_out" and row["category"] in ("gender", "age")), row["id"]
        if has:
            first, second = row["continuations"]
            assert first != second and first.startswith(" ") and second.startswith(" ")
            assert not {"he", "she", "his", "her", "him"} & set((first + second).lower().strip(".").split())
