"""Strip what should not be committed from executed notebooks: widget state, cell ids churn, metadata noise.

Usage: ``python -m course_utils.nbclean notebooks/*.ipynb`` (``make notebooks`` runs it).
"""

from __future__ import annotations

import re
import sys

import nbformat

NOISY_METADATA = ("widgets", "colab", "accelerator", "gpuClass")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# A tqdm bar's plain-text fallback ("distil:   0%|          | 0/20 [00:00<?, ?it/s]"): without its widget it is
# the bar frozen at its first frame, which reads like a run that never started.
_FROZEN_BAR = re.compile(r"^[^\n]*\d+%\|[^|\n]*\| *[\d.]+[kMG]?/[\d.]+[kMG]? \[[^\n]*\]$")


def is_progress_view(output: dict) -> bool:
    """True for a widget's output (a progress bar, the explorer: without the stripped state it cannot render, and
    its text fallback is a repr), or for the frozen text a progress bar leaves behind."""
    data = output.get("data", {})
    if output.get("output_type") == "stream":  # a bar written to stderr as text (lm-eval's): only its frames
        text = output.get("text", "")
        frames = [f.strip() for f in re.split(r"[\r\n]", "".join(text) if isinstance(text, list) else text)]
        return output.get("name") == "stderr" and all(_FROZEN_BAR.match(f) for f in frames if f)  # or blank
    if output.get("output_type") not in ("display_data", "execute_result"):
        return False
    if WIDGET_VIEW in data:
        return True
    if output.get("output_type") != "display_data":
        return False
    text = data.get("text/plain", "")
    text = "".join(text) if isinstance(text, list) else text
    return set(data) == {"text/plain"} and bool(_FROZEN_BAR.match(text.strip()))


def clean(path: str) -> None:
    """Remove widget state, progress-bar views and Colab metadata; drop per-cell execution timing."""
    nb = nbformat.read(path, as_version=4)
    for key in NOISY_METADATA:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("executionInfo", None)
        cell.metadata.pop("colab", None)
        if "outputs" in cell:
            cell.outputs = [output for output in cell.outputs if not is_progress_view(output)]
    nbformat.write(nb, path)


def main(paths: list[str]) -> None:
    for path in paths:
        clean(path)


if __name__ == "__main__":
    main(sys.argv[1:])
