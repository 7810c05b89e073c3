"""`python -m lab paper`: the paper's comparison at a scale a 2-core CPU runs, with seeds.

Subramanian et al. (2020) report that a 30-layer hierarchical model has a 23% smaller memory
footprint and a better perplexity than a vanilla transformer of at most 14 layers. This benchmark
trains the recipes in lab/recipes/paper/ -- vanilla with N = 3 layers, vanilla with 2N (the depth
reference), and bottom-up (sum and attention aggregation), top-down and retina with 2N layers, most
at coarse scales -- on the built-in corpus with the same width, vocabulary, context (1024 tokens),
tokens and schedule, each with several seeds, and reports for each model: validation bits per byte
(mean and spread over seeds), the memory of a training step split into its parts (msllm.train.memory),
tokens/s and FLOPs/token; then a verdict on the claim at this scale, and two plots.

Each run is `msllm train RECIPE --set run.seed=S --set run.output_dir=...` in a subprocess; its
result is kept in `<runs>/<model>-seed<S>/result.json`, and a rerun skips the runs that have one,
so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from lab import RECIPES, REPO, RESULTS
from msllm.bench import plotting
from msllm.config import load_recipe
from msllm.data import prepare_dataset
from msllm.errors import MsllmError
from msllm.models import build_model, flops_per_token
from msllm.train.memory import count_parameters, measure_step_peak, step_memory

MODELS = ("vanilla-3", "vanilla-6", "bottom_up-6", "bottom_up_attention-6", "top_down-6", "retina-6")
REFERENCE = "vanilla-3"  # the paper's "vanilla transformer with less than half as many layers"
HIERARCHICAL = ("bottom_up-6", "bottom_up_attention-6", "top_down-6", "retina-6")
SEEDS = (1, 2, 3)


def bench_paper(args: argparse.Namespace) -> str:
    """Train every (model, seed), then tabulate, plot and judge. Returns the markdown section."""
    grid = SeedGrid.from_args(args, "paper", RECIPES / "paper", REPO / "runs" / "paper", MODELS)
    grid.prepare_shards()
    results = grid.train()
    summary = {
        m: summarize(m, [results[(m, s)] for s in grid.seeds], grid.recipe(m), grid.overrides_for(m))
        for m in grid.models
    }
    out = Path(getattr(args, "out", None) or RESULTS)
    plots = plot(summary, [results[(m, s)] for m in grid.models for s in grid.seeds], out)
    return to_markdown(summary, grid.seeds, grid.jobs, grid.threads, plots)


@dataclasses.dataclass(frozen=True)
class SeedGrid:
    """What a comparison benchmark (paper, bytes) trains: every model of a recipes folder with
    every seed, `jobs` runs at a time with `threads` torch threads each, each run in its own folder
    under `runs` (train_once). Relative paths in the recipes (data.shards_dir) are relative to
    `root`, the repository, not to the current folder."""

    bench: str
    recipes: Path
    runs: Path
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: list[str]
    jobs: int
    root: Path = REPO

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, bench: str, recipes: Path, runs: Path, models: tuple[str, ...]
    ) -> SeedGrid:
        """The grid the command line asks for (--recipes, --runs, --root, --seeds, --models, --set, --jobs),
        else the benchmark's defaults; a missing recipe is one line."""
        grid = cls(
            bench=bench,
            recipes=Path(getattr(args, "recipes", None) or recipes),
            runs=Path(getattr(args, "runs", None) or runs),
            models=tuple(getattr(args, "models", None) or models),
            seeds=tuple(getattr(args, "seeds", None) or SEEDS),
            overrides=list(getattr(args, "set", None) or []),
            jobs=getattr(args, "jobs", 0) or max(1, min(2, os.cpu_count() or 1)),
            root=Path(getattr(args, "root", None) or REPO),
        )
        missing = [m for m in grid.models if not grid.recipe(m).is_file()]
        if missing:
            raise MsllmError(
                f"no recipe {grid.recipes}/{missing[0]}.yaml (pass --recipes DIR, a folder of the models' recipes)"
            )
        return grid

    @property
    def threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.jobs)

    def recipe(self, model: str) -> Path:
        return self.recipes / f"{model}.yaml"

    def folder(self, model: str, seed: int) -> Path:
        return self.runs / f"{model}-seed{seed}"

    def overrides_for(self, model: str) -> list[str]:
        """The `--set` overrides of a model's runs: the command line's, then its shards folder, if
        relative, made absolute against `root`."""
        shards = str(load_recipe(self.recipe(model), self.overrides).data.shards_dir)
        if "://" in shards or Path(shards).is_absolute():
            return list(self.overrides)
        return [*self.overrides, f"data.shards_dir={self.root / shards}"]

    def prepare_shards(self) -> dict:
        """Every model's recipe (overrides applied), after preparing each shards folder they name
        once: before the runs start, which share them, not in each of them."""
        loaded = {m: load_recipe(self.recipe(m), self.overrides_for(m)) for m in self.models}
        for data in {r.data.shards_dir: r.data for r in loaded.values()}.values():
            prepare_dataset(data, force=False)
        return loaded

    def train(self, finish=None) -> dict[tuple[str, int], dict]:
        """Every (model, seed)'s result, trained or read back (train_once); `finish(model, seed,
        result)`, if given, runs after each run in its worker and returns the result to keep."""

        def run(model: str, seed: int) -> dict:
            result = train_once(
                self.recipe(model), seed, self.folder(model, seed), self.overrides_for(model), self.threads, self.bench
            )
            return finish(model, seed, result) if finish else result

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {pool.submit(run, m, s): (m, s) for m in self.models for s in self.seeds}
            return {futures[f]: f.result() for f in concurrent.futures.as_completed(futures)}


def train_once(recipe: Path, seed: int, folder: Path, overrides: list[str], threads: int, bench: str = "paper") -> dict:
    """One training run, or its saved result. A folder without a result is an interrupted run:
    it is started again from scratch (the benchmark's runs keep no intermediate checkpoints).
    `bench`: the experiment that asks (`python -m lab bytes` trains its runs here too), for errors."""
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "msllm.cli",
        "train",
        str(recipe),
        "--set",
        f"run.seed={seed}",
        "--set",
        f"run.output_dir={folder}",
        *[x for o in overrides for x in ("--set", o)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # each run is a single process of its own
    log = folder.with_name(folder.name + ".log")
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise MsllmError(f"{bench}: {recipe.stem} seed {seed} failed ({tail[0]}); see {log}")
    result = read_metrics(folder / "metrics.jsonl", bench)
    result.update(model=recipe.stem, seed=seed)
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_file)  # a result file is whole or absent
    return result


def read_metrics(path: Path, bench: str = "paper") -> dict:
    """Eval curve (tokens, bits per byte), final bits per byte and median training tokens/s."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r["kind"] == "eval"]
    speeds = [r["tokens_per_s"] for r in rows if r["kind"] == "train"][1:]  # the first includes warm-up
    if not evals:
        raise MsllmError(f"{bench}: {path} has no eval rows (set eval.every)")
    return {
        "curve": [[r["tokens"], r["bits_per_byte"]] for r in evals],
        "bits_per_byte": evals[-1]["bits_per_byte"],
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def summarize(model: str, results: list[dict], recipe: Path, overrides: list[str]) -> dict:
    """Mean and spread over seeds; FLOPs/token; the computed memory split, and a measured peak."""
    r = load_recipe(recipe, overrides)
    vocab = r.data.tokenizer.vocab_size
    cfg = dataclasses.replace(r.model, vocab_size=vocab)
    bpb = [x["bits_per_byte"] for x in results]
    model = build_model(cfg)
    parameters = count_parameters(model)  # before step_memory casts it to the recipe's precision
    memory = step_memory(
        model, vocab, r.train.micro_batch_size, r.data.seq_len, r.train.precision, r.parallel.zero_stage
    )
    return {
        "model": model,
        "layers": cfg.layer_count(),
        "parameters": parameters,
        "bpb_mean": statistics.mean(bpb),
        "bpb_sd": statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
        "bpb_min": min(bpb),
        "bpb_max": max(bpb),
        "seeds": len(bpb),
        "tokens_per_s": statistics.mean(x["tokens_per_s"] for x in results if x["tokens_per_s"]),
        "flops_per_token": flops_per_token(cfg, r.data.seq_len),
        "memory": memory.as_dict(),
        "measured_peak": measure_step_peak(cfg, r.train.micro_batch_size, r.data.seq_len)
        if r.train.precision == "fp32"
        else None,
    }


def compare(model: dict, reference: dict) -> tuple[str, float, float]:
    """(judge's word, the difference in mean bits per byte, its standard error over the seeds) of
    two summaries (bpb_mean, bpb_sd, seeds)."""
    diff = model["bpb_mean"] - reference["bpb_mean"]
    se = math.sqrt(model["bpb_sd"] ** 2 / model["seeds"] + reference["bpb_sd"] ** 2 / reference["seeds"])
    return judge(diff, se), diff, se


def judge(diff: float, se: float) -> str:
    """The word for a difference in bits per byte (lower is better): "better" or "worse" when it
    exceeds twice its standard error, else "within noise"."""
    if diff < -2 * se:
        return "better"
    if diff > 2 * se:
        return "worse"
    return "within noise"


def verdict(model: dict, reference: dict) -> tuple[str, str]:
    """(holds | does not hold | within noise, the reason) for "smaller memory and better
    likelihood than the reference". A bits-per-byte difference counts when it exceeds twice its
    standard error over the seeds; within that, the claim is undecided ("within noise") unless the
    memory half already fails."""
    memory = model["memory"]["total"] / reference["memory"]["total"] - 1
    likelihood, diff, se = compare(model, reference)
    size = f"{diff:+.4f} bits/byte, {abs(diff) / se:.1f} standard errors" if se else f"{diff:+.4f} bits/byte"
    why = f"memory {memory:+.0%} ({'smaller' if memory < 0 else 'larger'}); likelihood {likelihood} ({size})"
    if memory >= 0 or likelihood == "worse":
        return "does not hold", why
    return ("holds" if likelihood == "better" else "within noise"), why


# The parts of a training step's memory (msllm.train.memory), bottom to top of each bar. Tables written
# before the loss's activations were counted apart have "activations" whole instead of the last two.
MEMORY_PARTS = ("parameters", "gradients", "optimizer", "body_activations", "loss_activations")


def plot(summary: dict, results: list[dict], out: Path) -> list[str]:
    """lab/results/paper-bpb.png (bits per byte against tokens, mean and min-max band over seeds)
    and lab/results/paper-memory.png (the memory of a training step, stacked by part)."""
    plotting.save(bpb_figure(results), out / "paper-bpb.png")
    plotting.save(memory_figure({m: s["memory"] for m, s in summary.items()}), out / "paper-memory.png")
    return ["paper-bpb.png", "paper-memory.png"]


def bpb_figure(results: list[dict]):
    """Validation bits per byte against training tokens: each model's mean over its seeds, and the
    band from the lowest to the highest seed."""
    fig, axes = plotting.new_figure(8.5, 4.5)
    ax = axes[0, 0]
    for model in dict.fromkeys(r["model"] for r in results):
        curves = [r["curve"] for r in results if r["model"] == model]
        plotting.seed_band(
            ax,
            model,
            [t for t, _ in curves[0]],
            [[b for _, b in c] for c in curves],
            dashed=model.startswith("vanilla"),
        )
    ax.set_xlabel("training tokens (thousands)")
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e3:,.0f}")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("The paper's comparison on the built-in corpus\n(mean of the seeds; band: lowest to highest)")
    ax.grid(alpha=0.3)
    plotting.legend_outside(fig, "right upper", ncols=1)
    return fig


def memory_figure(memory: dict[str, dict]):
    """{model: {part: bytes}} as one bar per model, stacked by part (MiB), its total on top."""
    fig, axes = plotting.new_figure(8.5, 4.5)
    ax = axes[0, 0]
    names = list(memory)
    split = all("body_activations" in m for m in memory.values())
    parts = MEMORY_PARTS if split else (*MEMORY_PARTS[:3], "activations")
    bottom = [0.0] * len(names)
    for part in parts:
        values = [memory[m].get(part, 0) / 2**20 for m in names]
        ax.bar(names, values, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:,.0f}", (x, total), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom")
    ax.set_ylim(0, 1.1 * max(bottom))  # room for the totals
    ax.set_ylabel("MiB per training step (one rank)")
    ax.set_title("Memory of a training step, by part (total on top)")
    ax.tick_params(axis="x", labelrotation=20)
    plotting.legend_outside(fig, "right upper", ncols=1)
    return fig


def replot(out: Path) -> list[str]:
    """lab/results/paper-memory.png again from the newest table in out/paper.md (no training). The
    bits-per-byte curves are in the runs' result.json files, not in the table: that plot needs the
    runs (`python -m lab paper` redraws both from them without training again)."""
    rows = plotting.table_rows(plotting.last_section((out / "paper.md").read_text()))
    memory = {
        r["model"]: {
            p: plotting.number(r[f"{p.replace('_', ' ')} MiB"]) * 2**20
            for p in (*MEMORY_PARTS, "activations")
            if f"{p.replace('_', ' ')} MiB" in r
        }
        for r in rows
    }
    plotting.save(memory_figure(memory), out / "paper-memory.png")
    return ["paper-memory.png"]


def to_markdown(summary: dict, seeds: tuple, jobs: int, threads: int, plots: list[str]) -> str:
    ref = summary.get(REFERENCE)
    rows = [
        f"Recipes: lab/recipes/paper/ (seeds {', '.join(map(str, seeds))}; {jobs} run{'s' if jobs != 1 else ''} at a "
        f"time, {threads} thread{'s' if threads != 1 else ''} each). Memory: one training step on one rank, "
        "computed by msllm.train.memory (the measured peak of real fp32 steps beside it); activations split into the "
        "body's and the loss's (msllm.train.loss, chunked).",
        "",
        "| model | layers | parameters | val bits/byte (mean ± sd) | range | tokens/s | MFLOP/token | parameters MiB | "
        "gradients MiB | optimizer MiB | body activations MiB | loss activations MiB | total MiB | measured peak MiB "
        "| total vs vanilla-3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        mem = s["memory"]
        mib = " | ".join(
            f"{mem[p] / 2**20:,.1f}"
            for p in ("parameters", "gradients", "optimizer", "body_activations", "loss_activations", "total")
        )
        peak = f"{s['measured_peak'] / 2**20:,.1f}" if s["measured_peak"] else "n/a"
        vs = f"{mem['total'] / ref['memory']['total'] - 1:+.1%}" if ref else ""
        rows.append(
            f"| {m} | {s['layers']} | {s['parameters'] / 1e6:.2f} M | {s['bpb_mean']:.4f} ± {s['bpb_sd']:.4f} | "
            f"{s['bpb_min']:.4f}-{s['bpb_max']:.4f} | {s['tokens_per_s']:,.0f} | {s['flops_per_token'] / 1e6:.1f} | "
            f"{mib} | {peak} | {vs} |"
        )
    if ref:
        rows += [
            "",
            f"Verdict on the paper's claim (smaller memory and better likelihood than {REFERENCE}), at this scale:",
            "",
        ]
        for m in HIERARCHICAL:
            if m in summary:
                word, why = verdict(summary[m], ref)
                rows.append(f"- {m}: **{word}** ({why})")
    rows += ["", *[f"![{p}]({p})" for p in plots]]
    return "\n".join(rows)
