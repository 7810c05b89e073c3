"""The `msllm` command: a thin layer that parses arguments and calls into the package.

Every command turns an `MsllmError` into one line on stderr and exit code 2, so that a bad recipe,
path or flag never shows a traceback.
"""

from __future__ import annotations

import argparse
import sys

from msllm.errors import MsllmError


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (YAML scalar syntax); repeatable",
    )


def _load(args: argparse.Namespace):
    from msllm.config import load_recipe

    return load_recipe(args.recipe, args.overrides)


def cmd_show_config(args: argparse.Namespace) -> int:
    if args.docs:
        from msllm.config import field_docs

        for key, tp, default, help in field_docs():
            print(f"{key}  ({tp}, default {default})\n    {help}")
        return 0
    print(_load(args).to_yaml(), end="")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from msllm.inspect import inspect_recipe

    inspect_recipe(_load(args), seq_len=args.seq_len, measure=not args.no_measure)
    return 0


def cmd_prep(args: argparse.Namespace) -> int:
    from msllm.data.prepare import prepare_dataset

    prepare_dataset(_load(args).data, force=args.force)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from msllm.train.trainer import train

    train(_load(args), overwrite=args.overwrite)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from msllm.train.evaluate import evaluate_checkpoint

    evaluate_checkpoint(_load(args), args.checkpoint)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from msllm.train.generate import generate_cli

    generate_cli(args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from msllm.train.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, force=args.force)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from msllm.bench import run_benchmark

    run_benchmark(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("show-config", help="print the resolved recipe (bases and overrides applied)")
    p.add_argument("recipe", nargs="?", help="path to a YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--docs", action="store_true", help="list every recipe field with its type and doc")
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("inspect", help="parameters per scale, FLOPs per token, the memory of a training step")
    _add_recipe(p)
    p.add_argument("--seq-len", type=int, default=0, help="measure at this length (default: data.seq_len)")
    p.add_argument("--no-measure", action="store_true", help="skip the forward/backward measurement")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prep", help="train the tokenizer and write MDS shards for a recipe's data")
    _add_recipe(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the shards are up to date")
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("train", help="train (one process, torchrun, deepspeed launcher or srun)")
    _add_recipe(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run.output_dir that holds a run: move the old run aside first (never deleted)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint")
    _add_recipe(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or the run's output_dir)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a checkpoint or an export")
    p.add_argument("source", help="checkpoint folder, run output_dir, or `msllm export` folder")
    p.add_argument("--prompt", required=True, action="append",
                   help="text to continue; repeat it for a batch (one text printed per prompt, blank-line separated)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="consolidated safetensors (+ Hugging Face Llama for vanilla)")
    p.add_argument("checkpoint", help="checkpoint folder or run output_dir")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run a benchmark and append its result to benchmarks/")
    p.add_argument("name", help="which benchmark (see `msllm bench --list`)", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--out", default="benchmarks", help="folder for the results")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="paper: recipe override for every run (e.g. train.max_steps=4 for a smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", help="paper: seeds of each model (default 1 2 3)")
    p.add_argument("--jobs", type=int, default=0, help="paper: runs at a time (default: 2 on 2+ cores)")
    p.add_argument("--runs", help="paper: folder of the runs and their results (default runs/paper)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "show-config" and not args.docs and not args.recipe:
        parser.error("show-config needs a recipe (or --docs)")
    try:
        return args.func(args)
    except MsllmError as exc:
        print(f"msllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment (a full disk, a read-only folder), not a bug: one line too
        where = f": {exc.filename}" if exc.filename else ""
        print(f"msllm {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
