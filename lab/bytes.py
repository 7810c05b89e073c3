"""`python -m lab bytes`: byte-level models and learned chunking against BPE, with seeds.

Trains the recipes in lab/recipes/bytes/ on the built-in corpus, 3 seeds each:

    vanilla-bpe              vanilla on BPE tokens (a 4096-piece sentencepiece BPE tokenizer)
    vanilla-bytes-local      vanilla on bytes, local attention
    bottom_up-bytes-fixed    bottom-up on bytes, fixed pooling by 4
    bottom_up-bytes-dynamic  bottom-up on bytes, learned chunks (pool: dynamic, target ratio 4)

Every model reads the same bytes of text per step for the same steps and is sized to about the
same training FLOPs per byte (FLOPs per token, msllm.models.flops_per_token, times the shards'
tokens per byte; the dynamic model's at its realised compression too). Reported per model:
validation bits per byte (mean, sd, range over seeds), FLOPs per byte, the memory of a training
step (msllm.train.memory.step_memory), tokens/s and bytes/s; for the dynamic model the realised
compression and the learned chunk lengths. Two plots (bits per byte against training FLOPs, the
chunk-length histogram) and a verdict computed from the numbers: does learned chunking beat fixed
pooling, by how much against the seed spread?

Runs go through lab.paper's SeedGrid and train_once (a subprocess of `msllm train` each; a finished run's
result.json is kept and a rerun skips it), so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import statistics
from pathlib import Path

import torch

from lab import RECIPES, REPO, RESULTS
from lab.paper import SeedGrid
from msllm.bench import plotting
from msllm.data import build_dataloader, read_manifest
from msllm.models import build_model, flops_per_token
from msllm.train.memory import count_parameters, step_memory
from msllm.use.load import load_model

MODELS = ("vanilla-bpe", "vanilla-bytes-local", "bottom_up-bytes-fixed", "bottom_up-bytes-dynamic")
FIXED, DYNAMIC = "bottom_up-bytes-fixed", "bottom_up-bytes-dynamic"
HISTOGRAM_BATCHES = 8  # validation batches the trained dynamic model is cut on for the chunk lengths
LONGEST_CHUNK = 32  # the histogram's last bin holds every chunk of this many positions or more


def bench_bytes(args: argparse.Namespace) -> str:
    """Train every (model, seed), then tabulate, plot and judge. Returns the markdown section."""
    grid = SeedGrid.from_args(args, "bytes", RECIPES / "bytes", REPO / "runs" / "bytes", MODELS)
    loaded = grid.prepare_shards()
    results = grid.train(lambda m, s, result: add_chunking(result, grid.folder(m, s), loaded[m]))
    summary = {m: summarize([results[(m, s)] for s in grid.seeds], loaded[m]) for m in grid.models}
    out = Path(getattr(args, "out", None) or RESULTS)
    plots = plot(summary, {m: [results[(m, s)] for s in grid.seeds] for m in grid.models}, out)
    return to_markdown(summary, grid.seeds, grid.jobs, grid.threads, plots)


def dynamic_scale(recipe):
    """The recipe's dynamic scale and its index, or (None, None)."""
    for s, scale in enumerate(recipe.model.scales):
        if scale.pool == "dynamic":
            return s, scale
    return None, None


def add_chunking(result: dict, folder: Path, recipe) -> dict:
    """For a dynamic model: the realised compression over training (train rows' mean) and the
    chunk lengths of the trained model on validation data, added to result.json once."""
    s, _ = dynamic_scale(recipe)
    if s is None or "chunk_lengths" in result:
        return result

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    compression = [r[f"compression_s{s}"] for r in rows if r["kind"] == "train"]
    model = load_model(str(folder)).model
    loader = build_dataloader(recipe.data, "validation", recipe.train.micro_batch_size, seed=0, shuffle=False)
    lengths: collections.Counter = collections.Counter()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= HISTOGRAM_BATCHES:
                break
            model.hidden_states(batch["input_ids"])
            for row in model.pools[s - 1].last_chunks.boundaries:
                ends = torch.nonzero(row)[:, 0]
                # A chunk is the positions after one boundary up to the next (the first chunk is
                # position 0 alone; the last, unfinished one is left out).
                lengths.update(min(int(n), LONGEST_CHUNK) for n in torch.diff(ends))
    result = dict(
        result,
        compression=statistics.mean(compression),
        compression_last=compression[-1],
        chunk_lengths={str(k): v for k, v in sorted(lengths.items())},
    )
    result_file = folder / "result.json"
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_file)
    return result


def tokens_per_byte(recipe) -> float:
    """Of the shards' train split (sentencepiece: ~0.3; bytes: 1 plus one EOS per document)."""
    split = read_manifest(recipe.data.shards_dir, recipe.data)["splits"]["train"]
    return split["tokens"] / split["bytes"]


def model_config(recipe, compression: float | None = None):
    """The recipe's model at its data's vocabulary; with `compression`, its dynamic scale's
    target_ratio set to it (the FLOPs it really spent: flops_per_token counts a dynamic scale at
    its target ratio)."""
    cfg = dataclasses.replace(
        recipe.model, vocab_size=recipe.model.vocab_size or recipe.data.tokenizer.data_vocab_size()
    )
    s, scale = dynamic_scale(recipe)
    if s is not None and compression is not None:
        scales = list(cfg.scales)
        scales[s] = dataclasses.replace(scale, target_ratio=max(compression, 1.0 + 1e-6))
        cfg = dataclasses.replace(cfg, scales=scales)
    return cfg


def summarize(results: list[dict], recipe) -> dict:
    """Mean and spread over seeds; FLOPs per byte (at the realised compression for a dynamic
    model); the memory of a training step; speed in tokens and bytes per second."""
    bpb = [x["bits_per_byte"] for x in results]
    tpb = tokens_per_byte(recipe)

    cfg = model_config(recipe)
    torch.manual_seed(recipe.run.seed)  # a dynamic model's step memory depends on where its untrained router cuts
    model = build_model(cfg)
    parameters = count_parameters(model)
    memory = step_memory(
        model,
        cfg.vocab_size,
        recipe.train.micro_batch_size,
        recipe.data.seq_len,
        recipe.train.precision,
        recipe.parallel.zero_stage,
    )
    compression = [x["compression"] for x in results if "compression" in x]
    realised = statistics.mean(compression) if compression else None
    fpt = flops_per_token(model_config(recipe, realised), recipe.data.seq_len)
    speed = statistics.mean(x["tokens_per_s"] for x in results if x["tokens_per_s"])
    lengths: collections.Counter = collections.Counter()
    for x in results:
        lengths.update({int(k): v for k, v in x.get("chunk_lengths", {}).items()})
    return {
        "parameters": parameters,
        "bpb_mean": statistics.mean(bpb),
        "bpb_sd": statistics.stdev(bpb) if len(bpb) > 1 else 0.0,
        "bpb_min": min(bpb),
        "bpb_max": max(bpb),
        "seeds": len(bpb),
        "tokens_per_byte": tpb,
        "flops_per_token": fpt,
        "flops_per_byte": fpt * tpb,
        "nominal_flops_per_byte": flops_per_token(cfg, recipe.data.seq_len) * tpb,
        "train_bytes": statistics.mean(x["curve"][-1][0] for x in results) / tpb,
        "tokens_per_s": speed,
        "bytes_per_s": speed / tpb,
        "memory": memory.as_dict(),
        "compression": realised,
        "compression_sd": statistics.stdev(compression) if len(compression) > 1 else 0.0,
        "target_ratio": dynamic_scale(recipe)[1].target_ratio if realised is not None else None,
        "chunk_lengths": dict(sorted(lengths.items())),
    }


def compare(model: dict, reference: dict) -> tuple[str, float, float]:
    """("better" | "worse" | "within noise", difference in bits per byte, its standard error over
    the seeds): a difference counts when it exceeds twice its standard error."""
    diff = model["bpb_mean"] - reference["bpb_mean"]
    se = math.sqrt(model["bpb_sd"] ** 2 / model["seeds"] + reference["bpb_sd"] ** 2 / reference["seeds"])
    if diff < -2 * se:
        return "better", diff, se
    if diff > 2 * se:
        return "worse", diff, se
    return "within noise", diff, se


def verdict(summary: dict) -> list[str]:
    """Plain-words conclusions computed from the table: dynamic against fixed first, then each
    byte-level model against BPE."""

    def against(name: str, reference: str) -> str:
        word, diff, se = compare(summary[name], summary[reference])
        relative = f"{abs(diff) / se:.1f} standard errors" if se else "no seed spread"
        spread = max(summary[name]["bpb_sd"], summary[reference]["bpb_sd"])
        return (
            (
                f"{name} is **{word}** than {reference}: {diff:+.4f} bits/byte ({relative}; the larger seed sd "
                f"is {spread:.4f})"
            )
            if word != "within noise"
            else (
                f"{name} is **within noise** of {reference}: {diff:+.4f} bits/byte ({relative}; the larger seed sd "
                f"is {spread:.4f})"
            )
        )

    lines = []
    if FIXED in summary and DYNAMIC in summary:
        word = compare(summary[DYNAMIC], summary[FIXED])[0]
        answer = {"better": "Yes", "worse": "No, it is worse", "within noise": "Not measurably"}[word]
        d = summary[DYNAMIC]
        lines.append(
            f"- Does learned chunking beat fixed pooling here? **{answer}.** "
            + against(DYNAMIC, FIXED)
            + f"; realised compression {d['compression']:.2f} (target {d['target_ratio']:g}), FLOPs/byte "
            f"{d['flops_per_byte'] / summary[FIXED]['flops_per_byte']:.2f}x the fixed model's."
        )
    if "vanilla-bpe" in summary:
        for name in summary:
            if name != "vanilla-bpe":
                lines.append(f"- {against(name, 'vanilla-bpe')}.")
    return lines


def plot(summary: dict, results: dict[str, list[dict]], out: Path) -> list[str]:
    """lab/results/bytes-bpb.png (bits per byte against training FLOPs) and, with a dynamic model,
    lab/results/bytes-chunks.png (its learned chunk lengths)."""
    plotting.save(bpb_figure(summary, results), out / "bytes-bpb.png")
    names = ["bytes-bpb.png"]
    if DYNAMIC in summary and summary[DYNAMIC]["chunk_lengths"]:
        plotting.save(chunks_figure(summary[DYNAMIC]), out / "bytes-chunks.png")
        names.append("bytes-chunks.png")
    return names


def bpb_figure(summary: dict, results: dict[str, list[dict]]):
    """Validation bits per byte against training FLOPs (tokens seen times FLOPs per token): each
    model's mean over its seeds, and the band from the lowest to the highest seed."""
    fig, axes = plotting.new_figure(8.5, 4.5)
    ax = axes[0, 0]
    for model, runs in results.items():
        fpt = summary[model]["flops_per_token"]
        flops = [t * fpt for t, _ in runs[0]["curve"]]
        plotting.seed_band(
            ax, model, flops, [[b for _, b in r["curve"]] for r in runs], dashed=model.startswith("vanilla")
        )
    ax.set_xlabel("training FLOPs (TFLOP)")
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e12:,.1f}")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Bytes vs BPE, fixed pooling vs learned chunks\n(mean of the seeds; band: lowest to highest)")
    ax.grid(alpha=0.3)
    plotting.legend_outside(fig, "right upper", ncols=1)
    return fig


def chunks_figure(dynamic: dict):
    """The learned chunk lengths of the dynamic model (all seeds, validation data), with the target."""
    fig, axes = plotting.new_figure(8.5, 4.0)
    ax = axes[0, 0]
    lengths = dynamic["chunk_lengths"]
    total = sum(lengths.values())
    ax.bar(list(lengths), [100 * v / total for v in lengths.values()], label="learned chunks")
    ax.axvline(
        dynamic["target_ratio"], color="black", linestyle="--", label=f"target ratio {dynamic['target_ratio']:g}"
    )
    ax.set_xlabel(f"chunk length in bytes (the last bar: {LONGEST_CHUNK} or more)")
    ax.set_ylabel("% of chunks")
    ax.set_title(
        f"Learned chunk lengths on validation bytes (mean compression in training {dynamic['compression']:.2f})"
    )
    ax.grid(alpha=0.3, axis="y")
    plotting.legend_outside(fig, "right upper", ncols=1)
    return fig


def to_markdown(summary: dict, seeds: tuple, jobs: int, threads: int, plots: list[str]) -> str:
    rows = [
        f"Recipes: lab/recipes/bytes/ (seeds {', '.join(map(str, seeds))}; {jobs} run{'s' if jobs != 1 else ''} at a "
        f"time, {threads} thread{'s' if threads != 1 else ''} each). FLOPs/byte: training FLOPs per token "
        "(msllm.models.flops_per_token) times the shards' tokens per byte; for the dynamic model at its realised "
        "compression (nominal: at its target ratio). Memory: one training step on one rank "
        "(msllm.train.memory.step_memory; "
        "for the dynamic model at its untrained boundaries on random bytes).",
        "",
        "| model | parameters | val bits/byte (mean ± sd) | range | tokens/byte | MFLOP/byte | nominal MFLOP/byte | "
        "train bytes | tokens/s | bytes/s | step memory MiB | compression |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        compression = (
            f"{s['compression']:.2f} ± {s['compression_sd']:.2f} (target {s['target_ratio']:g})"
            if s["compression"] is not None
            else ""
        )
        rows.append(
            f"| {m} | {s['parameters'] / 1e6:.2f} M | {s['bpb_mean']:.4f} ± {s['bpb_sd']:.4f} | "
            f"{s['bpb_min']:.4f}-{s['bpb_max']:.4f} | {s['tokens_per_byte']:.3f} | {s['flops_per_byte'] / 1e6:.2f} | "
            f"{s['nominal_flops_per_byte'] / 1e6:.2f} | {s['train_bytes']:,.0f} | {s['tokens_per_s']:,.0f} | "
            f"{s['bytes_per_s']:,.0f} | {s['memory']['total'] / 2**20:,.1f} | {compression} |"
        )
    dynamic = summary.get(DYNAMIC)
    if dynamic and dynamic["chunk_lengths"]:
        lengths = dynamic["chunk_lengths"]
        total = sum(lengths.values())
        mean = sum(k * v for k, v in lengths.items()) / total
        common = ", ".join(
            f"{k}: {100 * v / total:.0f}%" for k, v in sorted(lengths.items(), key=lambda kv: -kv[1])[:5]
        )
        rows += [
            "",
            f"Learned chunk lengths of {DYNAMIC} (trained models, {HISTOGRAM_BATCHES} validation batches per "
            f"seed, {total:,} chunks): mean {mean:.2f} bytes; most common {common}.",
        ]
    rows += [
        "",
        "Verdict (a difference counts when it exceeds twice its standard error over the seeds):",
        "",
        *verdict(summary),
        "",
        *[f"![{p}]({p})" for p in plots],
    ]
    return "\n".join(rows)
