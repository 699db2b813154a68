"""Assemble results/REPORT.md from the sections the benchmark scripts write.

Each benchmark calls ``write_section(order, name, title, body)``, which stores
``results/sections/<order>_<name>.md``; running this file concatenates them under a header that
says when, where and on what the numbers were measured. Nothing in the report is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
SECTIONS = RESULTS / "sections"


def measured_line() -> str:
    """When and where: the time now and ``machine_line()``; store it with the raw results to re-render later."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{stamp} on {machine_line()}"


def write_section(order: int, name: str, title: str, body: str, measured: str | None = None) -> Path:
    """Store one report section (markdown) for ``report.py`` to assemble; ``measured``: the stored
    ``measured_line()`` of the run that took the numbers, when re-rendering (default: now, this machine)."""
    SECTIONS.mkdir(parents=True, exist_ok=True)
    path = SECTIONS / f"{order:02d}_{name}.md"
    path.write_text(f"## {title}\n\n_Measured {measured or measured_line()}._\n\n{body.strip()}\n", encoding="utf-8")
    return path


@dataclass
class Run:
    """What every benchmark script starts from: the offline Llama, held-out text, items and calibration."""

    args: argparse.Namespace
    profile: object
    base: object  # the unpruned model
    tokenizer: object
    texts: list  # held-out paragraphs
    items: list  # last-word items
    calibration: list  # calibration batches (right-padded, from the calibration articles)


def start_run(description: str, calib_samples: int, extra: list[tuple] = ()) -> Run:
    """Parse the shared arguments (--eval-tokens, --lastword-items, --calib-samples) and load everything.

    ``extra``: the script's own options as (flag, type, default, help) tuples.
    """
    import course_utils
    from course_utils import data, evaluation, models

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per perplexity")
    parser.add_argument("--lastword-items", type=int, default=100)
    parser.add_argument("--calib-samples", type=int, default=calib_samples)
    for flag, kind, default, text in extra:
        parser.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args()
    profile = course_utils.setup(verbose=False)
    base, tokenizer = models.load_model("llama", profile)
    calibration = data.calibration_batches(tokenizer, data.load_texts("calibration", profile),
                                           n_samples=args.calib_samples, seq_len=256, seed=0)
    return Run(args=args, profile=profile, base=base, tokenizer=tokenizer,
               texts=data.load_texts("evaluation", profile),
               items=evaluation.lastword_items(profile, n_items=args.lastword_items), calibration=calibration)


def dated_log(name: str):
    """(log, file): ``log(*parts)`` prints a line and appends it, with the seconds since this call, to
    ``results/logs/<name>_<UTC date>.log``; close ``file`` at the end."""
    import datetime
    import time

    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = RESULTS / "logs" / f"{name}_{stamp}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("w", encoding="utf-8")

    def log(*parts) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        file.write(f"[{time.perf_counter() - started:7.1f} s] {text}\n")
        file.flush()

    return log, file


def machine_line() -> str:
    """Platform, cores, torch version and device: the context every number needs."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.platform()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"Python {platform.python_version()}, torch {torch.__version__}, {device}")


def build_report() -> Path:
    """Write results/REPORT.md from every section present."""
    sections = sorted(SECTIONS.glob("*.md"))
    if not sections:
        raise SystemExit("no sections in results/sections: run the benchmarks first (make benchmarks)")
    header = (
        "# Results report\n\n"
        "Written by `make course` (benchmarks/report.py) from the sections each benchmark script stores in "
        "`results/sections/`. Every number below was measured by the run that wrote it, on the machine its "
        "section names, except where a section says it renders the logged rows of an earlier run (speed ratios "
        "compare rows of one section, measured in one run).\n\n"
        "Profile: offline (SmolLM2-135M-Instruct as the Llama role; held-out text = the last 10 articles of the "
        "gensim Wikipedia excerpt). Perplexity: non-overlapping 512-token windows over the whole held-out split, "
        "or over its first N tokens where a section states a budget. "
        "Last-word accuracy: all generated held-out items, or the first N where a section says so. "
        "Speed: batch 1, 128-token prompt, 32 decoded tokens "
        "with the KV cache, median of 5 runs after a warm-up, unless a section states its own.\n"
    )
    body = "\n".join(path.read_text(encoding="utf-8") for path in sections)
    out = RESULTS / "REPORT.md"
    out.write_text(header + "\n" + body, encoding="utf-8")
    return out


if __name__ == "__main__":
    print(f"wrote {build_report()}")
