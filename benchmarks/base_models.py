"""Base-model rows of the report: parameters, held-out PPL, last-word accuracy, prefill and decode speed.

Run: ``python benchmarks/base_models.py`` (``make benchmarks``). Uses the whole held-out split.
"""

from __future__ import annotations

import json
import warnings

from report import RESULTS, write_section

import course_utils
from course_utils import data, evaluation, models


def main() -> None:
    profile = course_utils.setup(verbose=False)
    texts = data.load_texts("evaluation", profile)
    items = evaluation.lastword_items(profile, n_items=0)  # 0: all items
    rows, notes = [], []
    for role in ("llama", "gpt2"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, tokenizer = models.load_model(role, profile)
        placeholder = any("placeholder" in str(w.message) for w in caught)
        name = f"{role}: {profile.model_id(role)}" + (" (placeholder, random weights)" if placeholder else "")
        row = evaluation.evaluate_model(model, tokenizer, name, profile, texts=texts, max_tokens=None, n_items=0)
        rows.append(row)
        if placeholder:
            notes.append(f"- The offline GPT-2 role has no trained weights yet (`{name}`): its row only shows "
                         "the structure's size and speed; its PPL is that of a random model.")
        print(row)
    n_tokens = evaluation.token_stream(tokenizer, texts).numel()
    body = (f"Held-out split: {n_tokens:,} tokens (SmolLM2 tokenizer), {len(items)} last-word items.\n\n"
            + evaluation.markdown_table(rows) + "\n\n" + "\n".join(notes))
    write_section(0, "base_models", "Base models", body)
    (RESULTS / "base_models.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))


if __name__ == "__main__":
    main()
