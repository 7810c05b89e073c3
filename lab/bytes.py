"""`python -m lab bytes`: byte-level models and learned chunking against BPE, controlled, with seeds.

Trains the recipes in lab/recipes/bytes/ on the built-in corpus, 3 seeds each (issue 35's comparison):

    vanilla-bpe                         vanilla on BPE tokens (a 4096-piece sentencepiece BPE tokenizer)
    bottom_up-bytes-fixed               bottom-up on bytes, fixed pooling: the causal mean of every 4 bytes
    bottom_up-bytes-fixed-boundaries    dynamic chunking's code path (selection, EMA, straight-through
                                        confidence, H-Net's ingredients) with a chunk ending every 4 bytes
    bottom_up-bytes-fixed-boundaries-3  the same every 3 bytes (with the one above: equal compression)
    bottom_up-bytes-dynamic             learned boundaries as msllm had them (no H-Net ingredients)
    bottom_up-bytes-hnet                learned boundaries with H-Net's training ingredients
    bottom_up-bytes-hnet-mamba2         the same with Mamba-2 layers at the bytes (H-Net's outer stages)
    bottom_up-bytes-hnet-mamba2-fixed-boundaries  the same with a chunk ending every 4 bytes

Each verdict compares two models that differ in one thing: learned against fixed boundaries (each
learned model against the fixed-boundary model of the same mixer and ingredients: hnet against
fixed-boundaries, hnet-mamba2 against hnet-mamba2-fixed-boundaries), the ingredients (hnet against
dynamic), the outer mixer (hnet-mamba2 against hnet), the dynamic code path against mean pooling
(fixed-boundaries against fixed). The recipes bottom_up-bytes-dynamic+INGREDIENT add one ingredient at a time to
bottom_up-bytes-dynamic (run them with --models; each is judged against it).

Every model reads the same bytes of text per step for the same steps and is sized to about the
same training FLOPs per byte (FLOPs per token, msllm.models.flops_per_token, times the shards'
tokens per byte; a learned model's at its realised compression). A learned model whose realised
compression is not 4 is also compared at equal compression: against the fixed-boundary models'
bits per byte interpolated (linearly in the compression) to its own.

Reported per model: validation bits per byte (mean, sd, range over seeds), FLOPs per byte, the
memory of a training step (msllm.train.memory.step_memory), tokens/s and bytes/s; for the dynamic
models the realised compression, the chunk lengths of the trained models and the router's
diagnostics (the fraction of boundaries at a word start against the rate random boundaries would
give, the spread of p, the fraction of p near the threshold), whose curves over training are
plotted. Three plots (bits per byte against training FLOPs, the chunk-length histograms, the
router against the step) and a verdict computed from the numbers: a difference counts when it
exceeds twice its standard error over the seeds.

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
from lab.paper import SeedGrid, compare, judge
from msllm.bench import plotting
from msllm.data import build_dataloader, read_manifest
from msllm.models import build_model, flops_per_token
from msllm.train.memory import count_parameters, step_memory
from msllm.use.load import load_model

MODELS = (
    "vanilla-bpe",
    "bottom_up-bytes-fixed",
    "bottom_up-bytes-fixed-boundaries",
    "bottom_up-bytes-fixed-boundaries-3",
    "bottom_up-bytes-dynamic",
    "bottom_up-bytes-hnet",
    "bottom_up-bytes-hnet-mamba2",
    "bottom_up-bytes-hnet-mamba2-fixed-boundaries",
)
BPE, FIXED, _, _, DYNAMIC, HNET, HNET_MAMBA2, _ = MODELS
HISTOGRAM_BATCHES = 8  # validation batches each trained dynamic model is cut on for the chunk lengths
LONGEST_CHUNK = 32  # the histogram's last bin holds every chunk of this many positions or more
# The router's diagnostics (msllm.models.chunking.DynamicChunking.stats), logged per dynamic scale s
# as NAME_s<s> on every train row of metrics.jsonl.
ROUTER = ("compression", "p_std", "p_near_threshold", "word_start_boundaries", "word_start_rate")
END_FRACTION = 0.25  # "at the end of training": the mean over the last quarter of the train rows


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
    """For a model with a dynamic scale: the router's diagnostics over training (`router`: step and
    ROUTER values of every train row), the realised compression (the train rows' mean, which the
    FLOPs follow) and the chunk lengths of the trained model on validation data, added to
    result.json once."""
    s, _ = dynamic_scale(recipe)
    if s is None or "router" in result:
        return result

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    router = [[r["step"], *(r.get(f"{name}_s{s}") for name in ROUTER)] for r in rows if r["kind"] == "train"]
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
        compression=statistics.mean(r[1] for r in router),
        router=router,
        chunk_lengths={str(k): v for k, v in sorted(lengths.items())},
    )
    result_file = folder / "result.json"
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_file)
    return result


def router_at_end(result: dict) -> dict[str, float]:
    """Each ROUTER diagnostic at the end of training (the mean over the last END_FRACTION of the
    train rows; a diagnostic the run did not log, e.g. word starts on BPE tokens, is left out)."""
    rows = result["router"][-max(1, round(len(result["router"]) * END_FRACTION)) :]
    out = {}
    for i, name in enumerate(ROUTER, start=1):
        values = [r[i] for r in rows if r[i] is not None]
        if values:
            out[name] = statistics.mean(values)
    return out


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


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict], recipe) -> dict:
    """Mean and spread over seeds; FLOPs per byte (at the realised compression for a dynamic
    model); the memory of a training step; speed in tokens and bytes per second; for a dynamic
    model its boundaries (learned or fixed) and the router at the end of training."""
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
    _, scale = dynamic_scale(recipe)
    dynamic = [x for x in results if "router" in x]
    realised, realised_sd = mean_sd([x["compression"] for x in dynamic]) if dynamic else (None, 0.0)
    fpt = flops_per_token(model_config(recipe, realised), recipe.data.seq_len)
    speed = statistics.mean(x["tokens_per_s"] for x in results if x["tokens_per_s"])
    lengths: collections.Counter = collections.Counter()
    for x in results:
        lengths.update({int(k): v for k, v in x.get("chunk_lengths", {}).items()})
    at_end = [router_at_end(x) for x in dynamic]
    router = {name: mean_sd([e[name] for e in at_end]) for name in ROUTER if at_end and name in at_end[0]}
    bpb_mean, bpb_sd = mean_sd(bpb)
    return {
        "parameters": parameters,
        "bpb_mean": bpb_mean,
        "bpb_sd": bpb_sd,
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
        "compression_sd": realised_sd,
        "target_ratio": scale.target_ratio if scale is not None else None,
        "boundaries": scale.boundaries if scale is not None else None,
        "family": family(recipe),
        "mixer": recipe.model.scales[0].mixer,
        "router": router,
        "chunk_lengths": dict(sorted(lengths.items())),
    }


def family(recipe) -> list | None:
    """What a learned model and the fixed-boundary models it is judged against must share: the mixer
    of the bytes and H-Net's ingredients as resolved (residual projection, stage norms, embedding
    init, learning-rate multipliers). None without a dynamic scale (and its ingredients)."""
    m = recipe.model
    if dynamic_scale(recipe)[1] is None:
        return None
    return [
        m.scales[0].mixer,
        m.arch_config.uses_residual_proj(m),
        m.arch_config.uses_stage_norms(m),
        m.embedding_init_std(),
        list(recipe.train.lr_multipliers or m.default_lr_multipliers() or []),
    ]


def fixed_twin(summary: dict, name: str) -> str | None:
    """The fixed-boundary model of `name`'s family that cuts at `name`'s target ratio, if run."""
    s = summary[name]
    for other, o in summary.items():
        if o["boundaries"] == "fixed" and o["family"] == s["family"] and o["target_ratio"] == s["target_ratio"]:
            return other
    return None


def learned(summary: dict) -> list[str]:
    """The models whose boundaries are learned, in the summary's order."""
    return [m for m, s in summary.items() if s["boundaries"] == "learned"]


def at_compression(summary: dict, compression: float, of_family: list | None = None) -> dict | None:
    """The fixed-boundary models' bits per byte at `compression` (those of `of_family` only, if
    given), interpolated linearly between the two whose compressions bracket it ({"bpb_mean",
    "bpb_se", "between"}), or None outside their range (no extrapolation)."""
    fixed = sorted(
        (s["compression"], m)
        for m, s in summary.items()
        if s["boundaries"] == "fixed" and s["compression"] and of_family in (None, s.get("family"))
    )
    for (c_low, low), (c_high, high) in zip(fixed, fixed[1:]):
        if c_low <= compression <= c_high:
            w = (compression - c_low) / (c_high - c_low)
            lo, hi = summary[low], summary[high]
            return {
                "bpb_mean": (1 - w) * lo["bpb_mean"] + w * hi["bpb_mean"],
                "bpb_se": math.sqrt(
                    (1 - w) ** 2 * lo["bpb_sd"] ** 2 / lo["seeds"] + w**2 * hi["bpb_sd"] ** 2 / hi["seeds"]
                ),
                "between": (low, high),
            }
    return None


def verdict(summary: dict) -> list[str]:
    """Plain-words conclusions computed from the table: each question answered by the pair of models
    that differ in that one thing (present in the summary), then each byte-level model against BPE."""

    def against(name: str, reference: str) -> str:
        word, diff, se = compare(summary[name], summary[reference])
        relative = f"{abs(diff) / se:.1f} standard errors" if se else "no seed spread"
        spread = max(summary[name]["bpb_sd"], summary[reference]["bpb_sd"])
        return (
            f"{name} is **{word}** {'of' if word == 'within noise' else 'than'} {reference}: {diff:+.4f} bits/byte "
            f"({relative}; the larger seed sd is {spread:.4f})"
        )

    def question(text: str, name: str, reference: str) -> str:
        answer = {"better": "Yes", "worse": "No, it is worse", "within noise": "Not measurably"}
        return f"- {text} **{answer[compare(summary[name], summary[reference])[0]]}.** " + against(name, reference)

    def flops(name: str, reference: str) -> str:
        return f"FLOPs/byte {summary[name]['flops_per_byte'] / summary[reference]['flops_per_byte']:.2f}x {reference}'s"

    def compression(name: str) -> str:
        s = summary[name]
        return f"realised compression {s['compression']:.2f} (target {s['target_ratio']:g})"

    lines = []
    for name in learned(summary):
        twin = fixed_twin(summary, name)
        if twin:
            lines.append(
                question(
                    "Do learned boundaries beat fixed ones (the same code path, mixer and ingredients)?", name, twin
                )
                + f"; {compression(name)}, {flops(name, twin)}."
            )
    for name in learned(summary):
        s = summary[name]
        if s["compression"] is None or abs(s["compression"] - s["target_ratio"]) <= 0.05:
            continue
        equal = at_compression(summary, s["compression"], s["family"])
        if equal is None:
            lines.append(
                f"- {name} realised compression {s['compression']:.2f}: no two fixed-boundary models of its "
                "family bracket it, so no comparison at equal compression."
            )
            continue
        se = math.sqrt(s["bpb_sd"] ** 2 / s["seeds"] + equal["bpb_se"] ** 2)
        diff = s["bpb_mean"] - equal["bpb_mean"]
        lines.append(
            f"- At equal compression ({s['compression']:.2f}), {name} is **{judge(diff, se)}** "
            f"{'of' if judge(diff, se) == 'within noise' else 'than'} fixed boundaries there "
            f"({' and '.join(equal['between'])} interpolated: {equal['bpb_mean']:.4f}): {diff:+.4f} bits/byte "
            f"({abs(diff) / se if se else 0:.1f} standard errors)."
        )
    if HNET in summary and DYNAMIC in summary:
        lines.append(question("Do H-Net's training ingredients help learned chunking?", HNET, DYNAMIC) + ".")
    for name in summary:  # the ingredients one at a time: lab/recipes/bytes/bottom_up-bytes-dynamic+NAME.yaml
        if name.startswith(f"{DYNAMIC}+") and DYNAMIC in summary:
            ingredient = name.removeprefix(f"{DYNAMIC}+")
            lines.append(question(f"Does {ingredient} alone help learned chunking?", name, DYNAMIC) + ".")
    if HNET_MAMBA2 in summary and HNET in summary:
        lines.append(question("Do Mamba-2 outer stages help?", HNET_MAMBA2, HNET) + f"; {flops(HNET_MAMBA2, HNET)}.")
    # Against fixed pooling only the models of its mixer at the bytes (attention): a Mamba-2 model
    # differs in more than its chunks.
    same_mixer = [m for m in summary if FIXED in summary and summary[m]["mixer"] == summary[FIXED]["mixer"]]
    for name in same_mixer:
        s = summary[name]
        if s["boundaries"] == "fixed" and s["target_ratio"] == 4:
            lines.append(
                question("Does dynamic chunking's code path with fixed boundaries beat mean pooling?", name, FIXED)
                + "."
            )
    if FIXED in summary:
        for name in [m for m in learned(summary) if m in same_mixer]:
            lines.append(
                question("Does learned chunking beat fixed pooling here?", name, FIXED)
                + f"; {compression(name)}, {flops(name, FIXED)}."
            )
    for name in learned(summary):
        router = summary[name]["router"]
        if "word_start_boundaries" not in router:
            continue
        (at_start, sd), (rate, _) = router["word_start_boundaries"], router["word_start_rate"]
        word = judge(rate - at_start, sd / math.sqrt(summary[name]["seeds"]))
        found = {"better": "more often than", "worse": "less often than", "within noise": "as often as"}[word]
        lines.append(
            f"- Did {name}'s boundaries learn where words start? At the end of training "
            f"{100 * at_start:.1f}% ± {100 * sd:.1f}% of its boundaries fall at a word start, **{found}** "
            f"random boundaries would ({100 * rate:.1f}%); {100 * router['p_near_threshold'][0]:.0f}% of p within "
            f"0.05 of the threshold, p's sd {router['p_std'][0]:.3f}."
        )
    if BPE in summary:
        for name in summary:
            if name != BPE:
                lines.append(f"- {against(name, BPE)}.")
    return lines


def plot(summary: dict, results: dict[str, list[dict]], out: Path) -> list[str]:
    """lab/results/bytes-bpb.png (bits per byte against training FLOPs) and, with learned models,
    bytes-chunks.png (their chunk lengths) and bytes-router.png (their router over training)."""
    plotting.save(bpb_figure(summary, results), out / "bytes-bpb.png")
    names = ["bytes-bpb.png"]
    chunked = [m for m in learned(summary) if summary[m]["chunk_lengths"]]
    if chunked:
        plotting.save(chunks_figure({m: summary[m] for m in chunked}), out / "bytes-chunks.png")
        plotting.save(router_figure({m: results[m] for m in chunked}), out / "bytes-router.png")
        names += ["bytes-chunks.png", "bytes-router.png"]
    return names


def bpb_figure(summary: dict, results: dict[str, list[dict]]):
    """Validation bits per byte against training FLOPs (tokens seen times FLOPs per token): each
    model's mean over its seeds, and the band from the lowest to the highest seed."""
    fig, axes = plotting.new_figure(9.5, 4.5)
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
    ax.set_title(
        "Bytes vs BPE, fixed pooling vs fixed and learned chunks\n(mean of the seeds; band: lowest to highest)"
    )
    ax.grid(alpha=0.3)
    plotting.legend_outside(fig, "right upper", ncols=1)
    return fig


def chunks_figure(models: dict[str, dict]):
    """The chunk lengths of each learned model (all seeds, validation data), beside the lengths that
    boundaries placed at random at the same rate would give (geometric, the same mean length)."""
    fig, axes = plotting.new_figure(9.5, 4.0)
    ax = axes[0, 0]
    width = 0.8 / len(models)
    for i, (name, s) in enumerate(models.items()):
        lengths = s["chunk_lengths"]
        total = sum(lengths.values())
        ax.bar(
            [k - 0.4 + (i + 0.5) * width for k in lengths],
            [100 * v / total for v in lengths.values()],
            width,
            label=name,
        )
        if i == 0:
            mean = sum(k * v for k, v in lengths.items()) / total
            ks = range(1, LONGEST_CHUNK)
            ax.plot(
                ks,
                [100 * (1 / mean) * (1 - 1 / mean) ** (k - 1) for k in ks],
                color="black",
                linestyle=":",
                label=f"random cuts, mean {mean:.2f} ({name.removeprefix('bottom_up-bytes-')})",
            )
    ax.axvline(next(iter(models.values()))["target_ratio"], color="black", linestyle="--", label="target ratio")
    ax.set_xlabel(f"chunk length in bytes (the last bars: {LONGEST_CHUNK} or more)")
    ax.set_ylabel("% of chunks")
    ax.set_title("Learned chunk lengths, validation bytes (all seeds)")
    ax.grid(alpha=0.3, axis="y")
    plotting.legend_outside(fig, "right upper", ncols=1)
    return fig


def router_figure(results: dict[str, list[dict]]):
    """The router of each learned model against the training step (mean of the seeds; band: lowest
    to highest): the compression, the fraction of boundaries at a word start (with the rate of random
    boundaries, dotted), the spread of p and the fraction of p near the threshold."""
    fig, axes = plotting.new_figure(11, 6.5, nrows=2, ncols=2)
    panels = (
        ("compression", "compression (positions per chunk)"),
        ("word_start_boundaries", "boundaries at a word start"),
        ("p_std", "sd of p"),
        ("p_near_threshold", "p within 0.05 of 0.5"),
    )
    for ax, (name, title) in zip(axes.flat, panels):
        i = 1 + ROUTER.index(name)
        for model, runs in results.items():
            steps = [r[0] for r in runs[0]["router"]]
            curves = [[r[i] for r in run["router"]] for run in runs]
            if any(v is None for c in curves for v in c):
                continue
            plotting.seed_band(ax, model, steps, curves)
            if name == "word_start_boundaries":
                rate = [r[1 + ROUTER.index("word_start_rate")] for r in runs[0]["router"]]
                ax.plot(steps, rate, color="black", linestyle=":", label="random boundaries (the word-start rate)")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_yscale("log")
    plotting.legend_outside(fig, "lower center", ncols=2)
    return fig


def to_markdown(summary: dict, seeds: tuple, jobs: int, threads: int, plots: list[str]) -> str:
    rows = [
        f"Recipes: lab/recipes/bytes/ (seeds {', '.join(map(str, seeds))}; {jobs} run{'s' if jobs != 1 else ''} at a "
        f"time, {threads} thread{'s' if threads != 1 else ''} each). FLOPs/byte: training FLOPs per token "
        "(msllm.models.flops_per_token) times the shards' tokens per byte; for a dynamic model at its realised "
        "compression (nominal: at its target ratio). Memory: one training step on one rank "
        "(msllm.train.memory.step_memory; "
        "for a dynamic model at its untrained boundaries on random bytes). Compression: mean over training and "
        "seeds. Word starts: the fraction of boundaries at a word start at the end of training (the last "
        f"{END_FRACTION:.0%} of the train rows), and in brackets the rate random boundaries would give.",
        "",
        "| model | parameters | val bits/byte (mean ± sd) | range | tokens/byte | MFLOP/byte | nominal MFLOP/byte | "
        "train bytes | tokens/s | bytes/s | step memory MiB | compression | word starts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        compression = (
            f"{s['compression']:.2f} ± {s['compression_sd']:.2f} (target {s['target_ratio']:g}, {s['boundaries']})"
            if s["compression"] is not None
            else ""
        )
        starts = s["router"].get("word_start_boundaries")
        word_starts = (
            f"{100 * starts[0]:.1f}% ({100 * s['router']['word_start_rate'][0]:.1f}%)" if starts is not None else ""
        )
        rows.append(
            f"| {m} | {s['parameters'] / 1e6:.2f} M | {s['bpb_mean']:.4f} ± {s['bpb_sd']:.4f} | "
            f"{s['bpb_min']:.4f}-{s['bpb_max']:.4f} | {s['tokens_per_byte']:.3f} | {s['flops_per_byte'] / 1e6:.2f} | "
            f"{s['nominal_flops_per_byte'] / 1e6:.2f} | {s['train_bytes']:,.0f} | {s['tokens_per_s']:,.0f} | "
            f"{s['bytes_per_s']:,.0f} | {s['memory']['total'] / 2**20:,.1f} | {compression} | {word_starts} |"
        )
    for name in learned(summary):
        lengths = summary[name]["chunk_lengths"]
        total = sum(lengths.values())
        if not total:
            continue
        mean = sum(k * v for k, v in lengths.items()) / total
        common = ", ".join(
            f"{k}: {100 * v / total:.0f}%" for k, v in sorted(lengths.items(), key=lambda kv: -kv[1])[:5]
        )
        random = ", ".join(f"{k}: {100 * (1 / mean) * (1 - 1 / mean) ** (k - 1):.0f}%" for k in range(1, 6))
        rows += [
            "",
            f"Chunk lengths of {name} (trained models, {HISTOGRAM_BATCHES} validation batches per seed, {total:,} "
            f"chunks): mean {mean:.2f} bytes; most common {common} (random boundaries at that mean: {random}).",
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
