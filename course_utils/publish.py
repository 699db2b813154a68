"""Where the course is published: one repository address behind every badge, clone cell and link.

The address lives once, in ``pyproject.toml`` (``[project.urls] Repository`` and ``[tool.course] branch``).
The notebooks and the README must carry copies of it (a Colab notebook clones the course before
``course_utils`` exists), so this module keeps the copies in step:

    python -m course_utils.publish --check                  # list every copy that disagrees (a test runs this)
    python -m course_utils.publish --repo OWNER/NAME        # publish under another name: rewrite every copy
    python -m course_utils.publish --repo OWNER/NAME --branch dev

It edits text only (badges, ``git clone`` URLs, the citation), never a cell's outputs, and runs from a
checkout of the course (it needs ``pyproject.toml``, ``README.md`` and ``notebooks/``).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?/[A-Za-z0-9._-]+")
_REPOSITORY_LINE = re.compile(r'^(Repository\s*=\s*")https://github\.com/([^"/]+/[^"/]+)(")', re.M)
_BRANCH_LINE = re.compile(r'^(branch\s*=\s*")([^"]+)(")', re.M)
# The copies: Colab badges and links, `git clone` URLs, plain links to the repository (README citation).
_PART = r"[^/\s\"'()\\]+"  # one path segment (notebooks hold URLs inside JSON strings: no backslash)
_COLAB = re.compile(rf"https://colab\.research\.google\.com/github/({_PART}/{_PART})/blob/({_PART})/")
_GITHUB = re.compile(rf"https://github\.com/({_PART}/{_PART}?)(?:\.git)?(?=[/\s\"'()\\,\]}}]|$)")


@dataclass(frozen=True)
class Address:
    repository: str  # "owner/name" on GitHub
    branch: str  # the branch Colab badges open


@dataclass(frozen=True)
class Copy:
    path: Path
    kind: str  # "colab" or "github"
    repository: str
    branch: str | None  # Colab links only


def find_root(start: Path | None = None) -> Path:
    """The checkout holding ``pyproject.toml`` with a ``[tool.course]`` table (searched upwards)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        project = folder / "pyproject.toml"
        if project.is_file() and "[tool.course]" in project.read_text():
            return folder
    raise FileNotFoundError(f"no course checkout above {here}: run this from a clone of the course repository "
                            "(it edits pyproject.toml, README.md and notebooks/)")


def address(root: Path | None = None) -> Address:
    """The published address, read from ``pyproject.toml``."""
    text = (find_root(root) / "pyproject.toml").read_text()
    repository, branch = _REPOSITORY_LINE.search(text), _BRANCH_LINE.search(text)
    if repository is None or branch is None:
        raise ValueError('pyproject.toml needs Repository = "https://github.com/OWNER/NAME" under [project.urls] '
                         'and branch = "..." under [tool.course]')
    return Address(repository.group(2), branch.group(2))


def files(root: Path | None = None) -> list[Path]:
    """Every file that carries a copy of the address: the README and the notebooks."""
    root = find_root(root)
    return [root / "README.md", *sorted((root / "notebooks").rglob("*.ipynb"))]


def copies(root: Path | None = None) -> list[Copy]:
    """Every Colab link and every link to the course's own repository, with what it points at.

    A ``github.com`` link counts as a copy when its repository has the published name's last part (other
    projects' links, such as a cited library, are left alone).
    """
    root = find_root(root)
    own_name = address(root).repository.split("/")[1].lower()
    found = []
    for path in files(root):
        text = path.read_text()
        found += [Copy(path, "colab", m.group(1), m.group(2)) for m in _COLAB.finditer(text)]
        found += [Copy(path, "github", m.group(1), None) for m in _GITHUB.finditer(text)
                  if m.group(1).split("/")[1].lower() == own_name]
    return found


def check(root: Path | None = None) -> list[str]:
    """One line per copy that disagrees with ``pyproject.toml`` (empty when all agree)."""
    root = find_root(root)
    target = address(root)
    problems = []
    for c in copies(root):
        if c.repository != target.repository or (c.kind == "colab" and c.branch != target.branch):
            where = f"{c.repository}" + (f" (branch {c.branch})" if c.branch else "")
            problems.append(f"{c.path.relative_to(root)}: {c.kind} link to {where}, expected {target.repository}"
                            + (f" (branch {target.branch})" if c.kind == "colab" else ""))
    if not any(c.kind == "colab" for c in copies(root)):
        problems.append("no Colab badge found in README.md or notebooks/")
    return problems


def rewrite(repository: str, branch: str | None = None, root: Path | None = None) -> list[Path]:
    """Point every copy (and ``pyproject.toml``) at ``repository`` (``owner/name``) and ``branch``.

    Returns the files changed. Validates before writing anything, so bad input changes no file.
    """
    if not isinstance(repository, str) or not NAME.fullmatch(repository):
        raise ValueError(f"repository must look like OWNER/NAME (GitHub's spelling); got {repository!r}")
    if branch is not None and not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
        raise ValueError(f"branch must be a git branch name; got {branch!r}")
    root = find_root(root)
    old = address(root)
    branch = branch or old.branch
    own = {c.repository for c in copies(root)} | {old.repository}
    changed = []
    for path in [root / "pyproject.toml", *files(root)]:
        text = path.read_text()
        new = _REPOSITORY_LINE.sub(rf"\g<1>https://github.com/{repository}\g<3>", text)
        new = _BRANCH_LINE.sub(rf"\g<1>{branch}\g<3>", new) if path.name == "pyproject.toml" else new
        new = _COLAB.sub(lambda m: f"https://colab.research.google.com/github/{repository}/blob/{branch}/", new)
        new = _GITHUB.sub(lambda m: f"https://github.com/{repository}" if m.group(1) in own else m.group(0), new)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", help="publish under OWNER/NAME: rewrite every badge, clone URL and link")
    parser.add_argument("--branch", help="the branch Colab badges open (default: keep the current one)")
    parser.add_argument("--check", action="store_true", help="list the copies that disagree; exit 1 if any")
    args = parser.parse_args(argv)
    if args.repo:
        changed = rewrite(args.repo, args.branch)
        print(f"{len(changed)} files now point at {address()}: " + ", ".join(p.name for p in changed))
    problems = check()
    for line in problems:
        print(line)
    if not problems:
        target = address()
        print(f"every badge, clone URL and link points at {target.repository} (branch {target.branch})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
