"""`msllm bench data-prep` and `msllm bench data-loader`.

Both work at the quickstart's size (recipes/quickstart.yaml: the Wikipedia sample, seq_len 512,
8000-piece tokenizer, its micro-batch) in a temporary folder, and return markdown figures. The
loader's throughput is set against what training consumes, measured in the same process: forward,
backward and AdamW steps of the quickstart model on the same batches.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

from msllm.bench import shipped_recipe
from msllm.config import DataConfig, load_recipe
from msllm.data import build_dataloader
from msllm.data import prepare as prep
from msllm.data.sources import wikipedia_sample_documents
from msllm.models import build_model
from msllm.train.bare import bare_step

# Copies of the Wikipedia sample tokenized by the throughput runs (one copy: ~1.1M tokens).
CORPUS_COPIES = 8
# Optimizer steps timed (after one warm-up) to measure what training consumes.
TRAINING_STEPS = 3


def quickstart_recipe():
    """recipes/quickstart.yaml (under --recipes), resolved."""
    return load_recipe(shipped_recipe("quickstart.yaml"))


# Worker counts of the throughput rows (`msllm prep` uses data.workers processes).
PREP_WORKERS = (1, 2, 4)


def quickstart_settings() -> tuple[DataConfig, int]:
    """The quickstart recipe's data section and micro-batch size."""
    recipe = quickstart_recipe()
    return recipe.data, recipe.train.micro_batch_size


def training_tokens_per_s(recipe, vocab_size: int, batches) -> float:
    """Tokens/s of forward + backward + AdamW of the recipe's model on `batches` in this process
    (one step of warm-up, then TRAINING_STEPS timed): what the loader has to keep up with."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(recipe.model, vocab_size=vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr)
    tokens, seconds = 0, 0.0
    for i, batch in enumerate(batches[: TRAINING_STEPS + 1]):
        t0 = time.perf_counter()
        bare_step(model, optimizer, batch["input_ids"], batch["labels"])
        if i:  # the first step pays for allocations
            seconds += time.perf_counter() - t0
            tokens += batch["input_ids"].numel()
    return tokens / seconds


def _rate(tokens: float, seconds: float) -> str:
    return f"{tokens / seconds / 1e6:.2f} M tokens/s"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: the work, whoever else shares the CPU."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_data_prep(args) -> str:
    """Tokenize + write throughput of `msllm prep` (1, 2, 4 workers), its parts, the end-to-end time,
    and `msllm prep` end to end on a corpus of many files against data.workers."""
    data_cfg, _ = quickstart_settings()
    rows = []
    with tempfile.TemporaryDirectory(prefix="msllm-bench-prep-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        cfg = dataclasses.replace(data_cfg, shards_dir=str(tmp / "quickstart"), workers=2)
        manifest = prep.prepare_dataset(cfg, force=True, quiet=True)
        end_to_end = time.perf_counter() - started
        tokenizer_file = tmp / "quickstart" / "tokenizer.model"
        processor = prep.load_sentencepiece(tokenizer_file)
        table = prep.bytes_per_token(processor)

        documents = wikipedia_sample_documents() * CORPUS_COPIES
        text_bytes = sum(len(d.encode("utf-8")) for d in documents)
        labelled = [("validation" if i % 20 == 0 else "train", d) for i, d in enumerate(documents)]

        for workers in PREP_WORKERS:
            out = tmp / f"throughput-{workers}"
            out.mkdir()
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
            counts = prep.write_shards(
                labelled, tokenizer_file, out, cfg.seq_len, workers, cfg.shard_size_limit, table, quiet=True
            )
            seconds = time.perf_counter() - t0
            tokens = counts["train"]["tokens"] + counts["validation"]["tokens"]
            rows.append((f"tokenize + write MDS, {workers} worker(s)", tokens, seconds, _cpu_seconds() - cpu0))

        # The parts, to see which one limits: tokenizing alone (2 processes), writing alone (1).
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        with multiprocessing.get_context("fork").Pool(2, prep._init_worker, (str(tokenizer_file),)) as pool:
            encoded = list(pool.imap(prep._encode_batch, prep._batches((0, s, d) for s, d in labelled)))
        seconds = time.perf_counter() - t0
        tokens = sum(len(t) for _, _, t, _, _ in encoded)
        rows.append(("tokenize only, 2 worker processes", tokens, seconds, _cpu_seconds() - cpu0))

        out = tmp / "write-only"
        writer = prep.WindowWriter(out, cfg.seq_len + 1, cfg.shard_size_limit, table)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        for _, _, tokens_array, n_docs, n_bytes in encoded:
            writer.add(tokens_array, n_docs, n_bytes)
        writer.finish()
        seconds = time.perf_counter() - t0
        rows.append(("write MDS only (zstd, sha1+xxh64), main process", tokens, seconds, _cpu_seconds() - cpu0))

        files_rows = _prep_many_files(tmp, documents, cfg, tokenizer_file)

    lines = [
        f"Corpus: the Wikipedia sample x {CORPUS_COPIES} ({len(documents)} documents, {text_bytes / 1e6:.1f} MB "
        f"of text), tokenizer: the quickstart's ({manifest['vocab_size']} pieces, {cfg.tokenizer.type}), "
        f"windows of {cfg.seq_len + 1} tokens.",
        "",
        "| step | tokens | wall s | throughput (wall) | CPU s | tokens per CPU-second |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {tokens:,} | {seconds:.2f} | {_rate(tokens, seconds)} | {cpu:.2f} | {_rate(tokens, cpu)} |"
        for name, tokens, seconds, cpu in rows
    ]
    split = manifest["splits"]
    tokenize_cpu, write_cpu = rows[len(PREP_WORKERS)][3], rows[len(PREP_WORKERS) + 1][3]
    lines += [
        "",
        f"The parts: tokenizing costs {tokenize_cpu:.2f} CPU-s and writing {write_cpu:.2f} CPU-s (streaming's "
        "per-sample MDS encoding in Python, then zstd per shard). Writing runs in the main process, so with "
        "2 workers on 2 cores three processes share two cores: the wall-clock figure is bounded by about "
        f"{rows[0][1] / max(write_cpu, (tokenize_cpu + write_cpu) / 2) / 1e6:.1f} M tokens/s on an idle machine.",
        "",
        f"End to end, `msllm prep recipes/quickstart.yaml --force` equivalent (read + strip the dump, "
        f"train the tokenizer, tokenize, write): {end_to_end:.1f} s for "
        f"{split['train']['tokens'] + split['validation']['tokens']:,} tokens; most of it is sentencepiece "
        "training and the wiki markup stripping, which run once per corpus.",
        "",
        f"`msllm prep` on many files: the same {len(documents)} documents as one text file each, the "
        "quickstart's tokenizer given (data.tokenizer.model, so no tokenizer training), end to end "
        "(list and hash the files, split, tokenize, write, merge the part indexes):",
        "",
        "| data.workers | files | text MB | wall s | MB/s of text | tokens/s (wall) | CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {workers} | {files} | {mb:.1f} | {seconds:.2f} | {mb / seconds:.2f} | {_rate(tokens, seconds)} "
        f"| {cpu:.2f} |"
        for workers, files, mb, seconds, tokens, cpu in files_rows
    ]
    return "\n".join(lines)


def _prep_many_files(tmp: Path, documents: list[str], cfg: DataConfig, tokenizer_file: Path) -> list[tuple]:
    """End-to-end `msllm prep` of one file per document, for each worker count in PREP_WORKERS."""
    corpus = tmp / "many-files"
    corpus.mkdir()
    for index, text in enumerate(documents):
        (corpus / f"doc{index:05d}.txt").write_text(text, encoding="utf-8")
    text_mb = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    rows = []
    for workers in PREP_WORKERS:
        files_cfg = dataclasses.replace(
            cfg,
            source="text",
            paths=[str(corpus / "*.txt")],
            shards_dir=str(tmp / f"many-files-{workers}"),
            workers=workers,
            tokenizer=dataclasses.replace(cfg.tokenizer, model=str(tokenizer_file)),
        )
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        manifest = prep.prepare_dataset(files_cfg, quiet=True)
        seconds = time.perf_counter() - t0
        tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["validation"]["tokens"]
        rows.append((workers, len(documents), text_mb, seconds, tokens, _cpu_seconds() - cpu0))
    return rows


def bench_data_loader(args) -> str:
    """Loader throughput (tokens/s) at the quickstart size, against what training consumes."""
    recipe = quickstart_recipe()
    data_cfg, batch_size = recipe.data, recipe.train.micro_batch_size
    with tempfile.TemporaryDirectory(prefix="msllm-bench-loader-") as tmp_name:
        cfg = dataclasses.replace(data_cfg, shards_dir=str(Path(tmp_name) / "quickstart"))
        manifest = prep.prepare_dataset(cfg, force=True, quiet=True)
        rows = []

        t0 = time.perf_counter()
        loader = build_dataloader(cfg, "train", batch_size=batch_size, seed=1234)
        stream = iter(loader)
        next(stream)
        first_batch = time.perf_counter() - t0
        batches = 10 * len(loader)  # ten epochs, so epoch starts are in the figure too
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(batches):
            tokens += next(stream)["input_ids"].numel()
        seconds = time.perf_counter() - t0
        rows.append((f"train, batch {batch_size}, shuffled, {batches} batches (10 epochs)", tokens, seconds))

        t0 = time.perf_counter()
        state = loader.state_dict()
        resumed = build_dataloader(cfg, "train", batch_size=batch_size, seed=1234)
        resumed.load_state_dict(state)
        next(iter(resumed))
        resume_seconds = time.perf_counter() - t0

        validation = build_dataloader(cfg, "validation", batch_size=batch_size, seed=1234)
        t0 = time.perf_counter()
        tokens = sum(b["input_ids"].numel() for b in validation)
        rows.append(("validation, one pass", tokens, time.perf_counter() - t0))
        training = training_tokens_per_s(
            recipe,
            int(manifest["vocab_size"]),
            list(build_dataloader(cfg, "validation", batch_size=batch_size, seed=1234)),
        )

    lines = [
        f"Shards: the quickstart's (Wikipedia sample, seq_len {cfg.seq_len}, {len(loader)} train batches of "
        f"{batch_size} per epoch), one process, data.num_workers 0. Tokens = input_ids elements.",
        "",
        f"Training consumes {training:,.0f} tokens/s here: the quickstart model ({recipe.model.arch}), forward + "
        f"backward + AdamW on batches of {batch_size}, {TRAINING_STEPS} steps after a warm-up, same process.",
        "",
        "| loader | tokens | seconds | throughput | x training |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} tokens/s "
        f"| {tokens / seconds / training:,.0f}x |"
        for name, tokens, seconds in rows
    ]
    lines += [
        "",
        f"Build + first batch: {first_batch:.2f} s; resume (new loader, load_state_dict, first batch): "
        f"{resume_seconds:.2f} s.",
    ]
    return "\n".join(lines)
