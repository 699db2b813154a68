"""The README's lesson table quotes one measured result per lesson; each number must be in that notebook's outputs."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURED = re.compile(r"\d{1,3}(?:,\d{3})+|\d+\.\d+")  # measured values: decimals and thousands (not settings)


def lesson_rows():
    lines = (ROOT / "README.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| # | notebook |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    measured = next(i for i, c in enumerate(columns) if c.startswith("measured"))
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        notebook = re.search(r"\((notebooks/[^)]+\.ipynb)\)", cells[1]).group(1)
        rows.append((notebook, cells[measured]))
    return rows


def outputs_text(notebook):
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    # printed text and rendered markdown (a cell's display(Markdown(...)) of measured values) both count
    return "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)


def test_every_lesson_quotes_a_result_its_notebook_printed():
    rows = lesson_rows()
    assert len(rows) == len(list((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    for notebook, quoted in rows:
        numbers = MEASURED.findall(quoted)
        assert numbers, f"{notebook}: the README quotes no measured number"
        printed = outputs_text(notebook)
        missing = [n for n in numbers if n not in printed]
        assert not missing, f"{notebook}: README quotes {missing}, which the committed outputs do not print"
