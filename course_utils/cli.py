"""``python -m course_utils prune``: the course's pipeline on any supported model, from the command line.

    python -m course_utils prune --model HuggingFaceTB/SmolLM2-135M --width 0.2 --depth 2 \\
        --recover kd --steps 200 --quantize int8 --out pruned-smollm2

or ``--recipe recipe.toml`` with the same field names as ``pipeline.Recipe`` (flags given on the command line
override the file). Every argument is checked before any weights load; the output directory appears only
when the run completed (model, tokenizer, model card, ``prune_report.json``).

A long recovery: ``--checkpoint-every 100`` saves its state beside the output (``OUT.checkpoints``); after an
interruption the same command with ``--resume`` continues from the last checkpoint. On several devices:
``accelerate launch --num_processes 4 -m course_utils prune ...`` (DDP; each process takes every 4th batch).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace

from . import pipeline

FLAGS = {  # flag -> (Recipe field, type, help)
    "--width": ("width", float, "share of every MLP's neurons removed, e.g. 0.2 (same width in every layer)"),
    "--width-method": ("width_method", str, f"neuron score: one of {', '.join(pipeline.WIDTH_METHODS)}"),
    "--multiple-of": ("multiple_of", int, "round the kept MLP width to a multiple of this (default 64)"),
    "--depth": ("depth", int, "decoder layers removed (lowest block influence)"),
    "--recover": ("recover", str, f"recovery after pruning: one of {', '.join(pipeline.RECOVERY)}"),
    "--steps": ("steps", int, "optimiser steps of the recovery"),
    "--lr": ("lr", float, "peak learning rate of the recovery (default 2e-4)"),
    "--alpha": ("alpha", float, "KD: share of the teacher's term (default 0.5)"),
    "--temperature": ("temperature", float, "KD temperature (default 1.0)"),
    "--quantize": ("quantize", str, f"one of {', '.join(pipeline.QUANTIZATION)} (int8: weight-only, torchao)"),
    "--calib-samples": ("calib_samples", int, "calibration paragraphs (default 32)"),
    "--eval-tokens": ("eval_tokens", int, "held-out tokens of each before/after perplexity (default 2048)"),
    "--seed": ("seed", int, "seed of every sampled choice (default 0)"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m course_utils", description="The course's command-line tools.")
    commands = top.add_subparsers(dest="command", required=True)
    prune = commands.add_parser("prune", help="prune, recover and quantize a model; save it with a report",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("--model", required=True, help="a saved model directory, a Hub id, or a course role (llama)")
    prune.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    prune.add_argument("--recipe", help="a .toml or .json file with Recipe fields; flags override it")
    for flag, (_, kind, text) in FLAGS.items():
        prune.add_argument(flag, type=kind, default=None, help=text)
    prune.add_argument("--no-refit", action="store_true", help="skip the least-squares refits (faster, worse)")
    prune.add_argument("--calibration-text", help="a text file (blank-line separated paragraphs) to calibrate on "
                                                  "instead of the profile's calibration split")
    prune.add_argument("--profile", choices=("offline", "full"), help="text and model profile (default: offline)")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    prune.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                       help="save the recovery state every N steps in OUT.checkpoints (kept until the run completes)")
    prune.add_argument("--resume", action="store_true",
                       help="continue an interrupted run of the same command from its last checkpoint")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    return top


def recipe_from(args: argparse.Namespace) -> pipeline.Recipe:
    recipe = pipeline.Recipe.from_file(args.recipe) if args.recipe else pipeline.Recipe()
    overrides = {name: getattr(args, flag.lstrip("-").replace("-", "_"))
                 for flag, (name, _, _) in FLAGS.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_refit:
        overrides["refit"] = False
    assert set(overrides) <= {f.name for f in fields(pipeline.Recipe)}
    return replace(recipe, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        recipe = recipe_from(args)
        request = pipeline.check_request(args.model, recipe, args.out, profile=args.profile,
                                         calibration_text=args.calibration_text, overwrite=args.overwrite,
                                         checkpoint_every=args.checkpoint_every, resume=args.resume)
    except ValueError as error:
        print(f"prune: {error}", file=sys.stderr)
        return 2
    result = pipeline.run(request, profile=args.profile, progress=not args.quiet)
    if not result.stages or result.stages[-1].step != "save":
        return 0  # a helper process of `accelerate launch`: the main process reports and saves
    print(result.table())
    print(f"saved to {result.out}; load with {result.loader}({str(result.out)!r})")
    return 0
