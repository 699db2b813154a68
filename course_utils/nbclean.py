"""Strip what should not be committed from executed notebooks: widget state, cell ids churn, metadata noise.

Usage: ``python -m course_utils.nbclean notebooks/*.ipynb`` (``make notebooks`` runs it).
"""

from __future__ import annotations

import sys

import nbformat

NOISY_METADATA = ("widgets", "colab", "accelerator", "gpuClass")


def clean(path: str) -> None:
    """Remove widget state and Colab metadata; drop per-cell execution timing."""
    nb = nbformat.read(path, as_version=4)
    for key in NOISY_METADATA:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("executionInfo", None)
        cell.metadata.pop("colab", None)
        for output in cell.get("outputs", []):
            output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    nbformat.write(nb, path)


def main(paths: list[str]) -> None:
    for path in paths:
        clean(path)


if __name__ == "__main__":
    main(sys.argv[1:])
