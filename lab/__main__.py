"""`python -m lab NAME`: run one of the lab's experiments and append its result to
lab/results/NAME.md (see lab/__init__.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msllm.bench import run_benchmark
from msllm.errors import MsllmError

if __package__ in (None, ""):  # `python lab NAME`: the folder run as a script; import it as the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab import EXPERIMENTS, RESULTS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lab",
        description="Run a lab experiment and append its result, with the command, date and machine, to "
        "OUT/NAME.md (plots beside it). OUT is lab/results/ of this checkout unless --out is given.",
    )
    p.add_argument("name", nargs="?", help="which experiment (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument(
        "--out",
        default=str(RESULTS),
        help="folder to append NAME.md to and write the plots in (default: lab/results, the committed results)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="paper, bytes: recipe override for every run (e.g. train.max_steps=4 for a smoke test)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="paper, bytes: seeds of each model (default 1 2 3)")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="paper, bytes: the models to train, by recipe name in --recipes (default: the experiment's own list)",
    )
    p.add_argument("--jobs", type=int, default=0, help="paper, bytes: runs at a time (default: 2 on 2+ cores)")
    p.add_argument(
        "--runs",
        help="paper, bytes: folder of the runs and their results (default runs/paper, runs/bytes of the repository)",
    )
    p.add_argument(
        "--recipes", help="paper, bytes: folder of the models' recipes (default lab/recipes/paper, lab/recipes/bytes)"
    )
    p.add_argument(
        "--root",
        help="paper, bytes: the folder the recipes' relative paths (their shards folders, data/...) "
        "are relative to (default: the repository)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m lab", *(sys.argv[1:] if argv is None else argv)])
    try:
        run_benchmark(args, EXPERIMENTS, command)
    except MsllmError as exc:
        print(f"lab {args.name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
