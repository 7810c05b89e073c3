"""The `msllm` command: a thin layer that parses arguments and calls into the package.

Every command turns an `MsllmError` into one line on stderr and exit code 2, so that a bad recipe,
path or flag never shows a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from msllm.errors import MsllmError

# What `msllm --help` says first (the module docstring above is for developers).
DESCRIPTION = (
    "Pretrain multi-scale transformer language models (bottom-up, top-down, retina and a vanilla "
    "baseline) from YAML recipes: prepare the data, train, evaluate, sample, export, benchmark."
)


class _PrintVersion(argparse.Action):
    """`--version`: the installed package's version, looked up only when asked (the lookup scans
    the installed distributions, tens of milliseconds that no other command should pay)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 (start-up: importlib.metadata loads for --version only)

        try:
            print(f"msllm {version('msllm')}")
        except PackageNotFoundError:  # imported from a source tree that was never pip-installed
            print("msllm (version unknown: not installed; pip install -e . records it)")
        parser.exit()


def line_buffered_stdout() -> None:
    """Send every line printed to stdout on at once, wherever stdout goes.

    Python block-buffers stdout when it is a file or a pipe (slurm's log, nohup, `tee`), so a
    running training's lines would reach the log only in 8 KiB blocks. Line buffering here, at the
    one entry point every launcher runs (the console script, `python -m msllm.cli`, torchrun,
    slurm_rank.py), covers every print of the process: the trainer's, DeepSpeed's, the loggers'.
    """
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe")
    _add_overrides(p)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (YAML scalar syntax); repeatable",
    )


def _load(args: argparse.Namespace):
    from msllm.config import load_recipe  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    return load_recipe(args.recipe, args.overrides)


def cmd_show_config(args: argparse.Namespace) -> int:
    if args.docs:
        from msllm.config import field_docs  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

        for key, tp, default, help in field_docs():
            print(f"{key}  ({tp}, default {default})\n    {help}")
        return 0
    print(_load(args).to_display_yaml(), end="")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from msllm.inspect import inspect_recipe  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    inspect_recipe(
        _load(args),
        seq_len=args.seq_len,
        measure=not args.no_measure,
        world_size=args.world_size,
        measure_len=args.measure_len,
    )
    return 0


def cmd_prep(args: argparse.Namespace) -> int:
    from msllm.data.prepare import prepare_dataset  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    prepare_dataset(_load(args).data, force=args.force)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from msllm.train.trainer import train  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    recipe = _load(args)
    try:
        train(recipe, overwrite=args.overwrite)
    except RuntimeError as exc:  # streaming's "Background thread failed" (the store stopped answering), or a rank died
        from msllm.data.manifest import store_unreachable  # noqa: PLC0415 (start-up: msllm --help imports no command's module)
        from msllm.distributed.collectives import lost_peer  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

        error = store_unreachable(exc, recipe.data.shards_dir) or lost_peer(exc, _last_checkpoint(recipe))
        if error is None:
            raise
        raise error from None
    return 0


def _last_checkpoint(recipe) -> str:
    """The checkpoint a rerun of `recipe` resumes from, in words."""
    from msllm.checkpoint.files import latest_complete  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    root = Path(recipe.run.output_dir) / "checkpoints"
    latest = latest_complete(root)
    return (
        f"the last checkpoint ({latest})" if latest is not None else f"the last checkpoint in {root} (none yet: step 0)"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from msllm.use.evaluate import evaluate_checkpoint  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    evaluate_checkpoint(_load(args), args.checkpoint)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from msllm.use.generate import generate_cli  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    generate_cli(args.source, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from msllm.use.export import export_checkpoint  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    export_checkpoint(args.checkpoint, args.out, force=args.force)
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from msllm.use.import_hf import write_import_recipe  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    write_import_recipe(args.folder, args.out, force=args.force)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from msllm.bench import run_benchmark  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    run_benchmark(args)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from msllm.doctor import doctor  # noqa: PLC0415 (start-up: msllm --help imports no command's module)

    doctor(args.output_dir, as_json=args.json, check=not args.no_check)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msllm", description=DESCRIPTION)
    parser.add_argument("--version", action=_PrintVersion, help="print msllm's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("show-config", help="print the resolved recipe (bases and overrides applied)")
    p.add_argument("recipe", nargs="?", help="path to a YAML recipe")
    _add_overrides(p)
    p.add_argument("--docs", action="store_true", help="list every recipe field with its type and doc")
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("inspect", help="parameters per scale, FLOPs per token, the memory of a training step")
    _add_recipe(p)
    p.add_argument("--seq-len", type=int, default=0, help="measure at this length (default: data.seq_len)")
    p.add_argument("--no-measure", action="store_true", help="skip the forward/backward measurement")
    p.add_argument(
        "--world-size",
        type=int,
        default=0,
        help="ranks of the job (default parallel.sp): the memory is one rank's, ZeRO sharded over world/sp",
    )
    p.add_argument(
        "--measure-len",
        type=int,
        default=0,
        help="measure the activations on samples of this many tokens and extend linearly to one rank's "
        "positions (for lengths too long to run here)",
    )
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
    p.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="text to continue; repeat it for a batch (one text printed per prompt, blank-line separated)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=100,
        help="tokens to sample at most; stops earlier at the end-of-text token (default 100)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="divide the logits by this before sampling; 0 is greedy (default 1.0)",
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens only; 0 keeps them all (default 0)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens whose probabilities sum to p (nucleus); "
        "1.0 keeps them all (default 1.0)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling: the same seed gives the same text (default 0)"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="consolidated safetensors and a Hugging Face folder (hf/), every architecture")
    p.add_argument("checkpoint", help="checkpoint folder, run output_dir, or `msllm export` folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="a recipe that starts a vanilla run from a local Hugging Face Llama folder")
    p.add_argument(
        "folder", help="Hugging Face Llama folder: config.json, *.safetensors, tokenizer.model (sentencepiece)"
    )
    p.add_argument("--out", required=True, help="recipe file to write (model, tokenizer and train.init_from set)")
    p.add_argument("--force", action="store_true", help="replace an existing recipe file")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser(
        "doctor",
        help="versions, devices, backends, kernels and their checks, matmul rate, free space (for bug reports)",
        description="What this machine offers msllm: library versions, devices and memory, distributed backends "
        "and DeepSpeed ops, the attention and loss kernels each device would train with and whether "
        "each passes its start-up check, a measured matmul rate against the known peak, and free "
        "space in the output and cache folders. Paste its output into bug reports.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--output-dir", default=".", help="the folder whose free space to report (default: .)")
    p.add_argument("--no-check", action="store_true", help="do not run the kernels' checks (faster)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "bench",
        help="measure this machine: run a benchmark and append its result to benchmarks/NAME.md (or --out)",
        description="Run a benchmark on this machine and append its result, with the command, date and machine, "
        "to OUT/NAME.md (plots beside it). OUT is benchmarks/ of the current folder unless --out "
        "is given. The recipes the benchmarks measure are those shipped in the msllm repository, read "
        "from recipes/ of the current folder unless --recipes is given. (The repository's experiments "
        "-- the paper's comparison, bytes, scaling, the quickstart's timing -- are in its lab/ folder: "
        "python -m lab --list.)",
    )
    p.add_argument("name", help="which benchmark (see `msllm bench --list`)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument(
        "--out",
        default="benchmarks",
        help="folder to append NAME.md to and write the plots in (default: benchmarks/ of the current folder)",
    )
    p.add_argument(
        "--recipes",
        default="recipes",
        help="the msllm repository's recipes/ folder, whose recipes the benchmarks measure (default: "
        "recipes/ of the current folder, as in a checkout's root)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="model-startup: recipe override for every run (e.g. train.max_steps=4 for a smoke test)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def address_space_limit(exc: ImportError) -> str | None:
    """The one line for a library that cannot be loaded under an address-space limit (`ulimit -v`,
    RLIMIT_AS): the dynamic loader fails to map its segments (libtorch_cpu.so, under 1-2 GiB), which
    Python reports as an ImportError. None for any other ImportError, or without such a limit."""
    import resource  # noqa: PLC0415 (start-up: only on a failed import)

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    text = str(exc)
    if limit == resource.RLIM_INFINITY or not (
        "failed to map segment" in text or "cannot allocate memory" in text.lower()
    ):
        return None
    return (
        f"cannot load a library ({text.splitlines()[0]}): the address-space limit (ulimit -v) of "
        f"{limit / 2**30:.1f} GiB is too small for PyTorch, which maps several GiB: raise it (ulimit -v unlimited) "
        "and rerun"
    )


def _not_the_cuda_home_warning(record: logging.LogRecord) -> bool:
    """On a machine with a CUDA toolkit but no GPU, importing DeepSpeed (through
    torch.utils.cpp_extension) logs "No CUDA runtime is found, using CUDA_HOME=..." on stderr, a
    second line before every one-line error. This filter drops that message only."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def main(argv: list[str] | None = None) -> int:
    line_buffered_stdout()
    logging.getLogger("torch.utils.cpp_extension").addFilter(_not_the_cuda_home_warning)  # once: same object
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
    except ImportError as exc:  # the first `import torch` of every command that needs it is under this try
        line = address_space_limit(exc)
        if line is None:
            raise
        print(f"msllm {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
