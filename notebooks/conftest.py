"""pytest plugin for the notebook run (nbval): a table of each notebook's wall time, slowest first.

nbval makes one test item per code cell; this sums setup + call + teardown of every item per notebook
(the kernel start counts towards the first cell) and prints the table at the end of the session, next
to the per-notebook budget of the README (lesson 3 min, solutions 2 min on 2 cores), and the run's wall
time. Under ``make test`` two workers share the 2 cores, one each, so a notebook's minutes there are one
core's (about 1.6x its 2-core time), while the wall time of the whole run drops. With
``COURSE_NB_TIMES=path.json`` the table (and the 40 slowest cells) is also written as JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

BUDGET_S = {"lesson": 180, "solutions": 120}  # per-notebook budget on a quiet 2-core machine
_seconds: dict[str, float] = defaultdict(float)
_cells: dict[str, int] = defaultdict(int)
_failed: set[str] = set()
_cell_seconds: dict[str, float] = defaultdict(float)
_started: list[float] = []


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker's kernels get one torch thread: two workers with two threads each on
    2 cores measured 2-4x slower per notebook (oversubscription)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionstart(session) -> None:
    _started.append(time.time())


def _notebook(nodeid: str) -> str | None:
    path = nodeid.split("::", 1)[0]
    return path if path.endswith(".ipynb") else None


def pytest_runtest_logreport(report) -> None:
    notebook = _notebook(report.nodeid)
    if notebook is None:
        return
    _seconds[notebook] += report.duration
    _cell_seconds[report.nodeid] += report.duration
    if report.when == "call":
        _cells[notebook] += 1
    if report.failed:
        _failed.add(notebook)


def pytest_terminal_summary(terminalreporter, config) -> None:
    if not _seconds:
        return
    workers = getattr(config.option, "numprocesses", None) or 0
    wall = time.time() - _started[0] if _started else float("nan")
    write = terminalreporter.write_line
    total = sum(_seconds.values())
    terminalreporter.section("notebook wall times (slowest first)")
    write(f"{'notebook':<58} {'cells':>5} {'min':>6} {'budget':>6}  status")
    rows = []
    for notebook, seconds in sorted(_seconds.items(), key=lambda item: -item[1]):
        kind = "solutions" if "/solutions/" in notebook else "lesson"
        over = seconds > BUDGET_S[kind]
        status = "FAILED" if notebook in _failed else ("over budget" if over else "ok")
        write(f"{notebook:<58} {_cells[notebook]:>5} {seconds / 60:>6.1f} {BUDGET_S[kind] / 60:>6.1f}  {status}")
        rows.append({"notebook": notebook, "cells": _cells[notebook], "seconds": round(seconds, 1),
                     "budget_seconds": BUDGET_S[kind], "status": status})
    write(f"{'all notebooks (sum)':<58} {sum(_cells.values()):>5} {total / 60:>6.1f}")
    how = f"{workers} workers, one core each: a notebook's minutes are one core's" if workers > 1 else "one worker"
    write(f"wall time of the run: {wall / 60:.1f} min ({how})")
    target = os.environ.get("COURSE_NB_TIMES")
    if target:
        with open(target, "w", encoding="utf-8") as handle:
            slowest = sorted(_cell_seconds.items(), key=lambda item: -item[1])[:40]
            json.dump({"total_seconds": round(total, 1), "wall_seconds": round(wall, 1), "workers": workers,
                       "notebooks": rows,
                       "slowest_cells": [{"cell": c, "seconds": round(t, 1)} for c, t in slowest]}, handle, indent=1)
