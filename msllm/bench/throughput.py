"""`msllm bench throughput`: training tokens/s, MFU and peak memory of each architecture against
the sequence length L, eager and compiled, in two loops: the bare loop of msllm/train/bare.py
(forward, cross-entropy, backward, AdamW step, on one batch) and `msllm train` itself (DeepSpeed,
the data loader, the callbacks, the non-finite guard), with the trainer's share of the bare loop's
speed; and Hugging Face LlamaForCausalLM at vanilla's dimensions in the bare loop as the outside
reference. Compiled means each transformer block compiled, as `train.compile` does, in both loops
(Llama: the whole model).

- On a GPU: the BookCorpus recipes' models (recipes/models/*-bookcorpus.yaml, vocabulary 8000),
  bf16 autocast, L = 1k, 4k, 16k, 64k, 128k, batch x L = 64k tokens (or one sample).
- On the CPU: the tiny recipes' models (recipes/models/*-tiny.yaml), fp32, L = 256 and 1k, 4k
  tokens per step, so that CI can smoke-test it (tests/unit/test_bench_throughput.py).

On the CPU each (model, L, mode) is measured in two rounds, bare loop and trainer alternately, and
each loop's faster round is kept: a shared machine's speed drifts by a third over minutes, more than
the difference being measured. Each (model, L, mode, loop) runs in a fresh process: its peak memory
(CUDA max_memory_allocated, or the process's peak RSS on the CPU) and its compile caches are its own, and
running out of memory ends only that row. The trainer reads the built-in corpus, cut into windows of L tokens
(data/throughput-V-L, prepared on first use), with ZeRO 0 like the bare loop, and is timed over
its second half of steps (the first half compiles and warms up). The table is returned
(run_benchmark appends it to benchmarks/throughput.md) and the plot is written to
benchmarks/throughput.png (one column per model: tokens/s, train / bare, peak memory).

Each bare-loop row also counts the operations one training step dispatches, forward + loss +
backward (not the optimizer): every aten operator call that reaches torch's dispatcher, counted by
a TorchDispatchMode (`dispatched_ops`). Eager, that is every operator of the step; compiled, the
mode is off while torch.compile traces and on while the compiled code runs, so it counts what the
compiled code still dispatches (matmuls and other extern kernels, the eager code between blocks),
not what inductor fused into its own kernels. Each dispatch costs host time, and on a GPU at
least one kernel launch: a step with fewer of them waits less on the host.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msllm.bench import plotting, shipped_recipe
from msllm.bench.plotting import last_section, number, table_rows
from msllm.checkpoint.llama import llama_arch
from msllm.config import load_recipe
from msllm.distributed.parallelize import compile_blocks
from msllm.metrics import peak_flops, peak_rss_bytes
from msllm.models import build_model, flops_per_token
from msllm.models.registry import ARCHS  # noqa: E402  (every registered architecture)
from msllm.train.bare import bare_step
from msllm.train.loss import choose_kernel, installed


@dataclass(frozen=True)
class Setting:
    """The sizes of one run of the benchmark."""

    recipes: str  # recipe path under the recipes folder (--recipes), {arch} filled in
    vocab_size: int  # 0: the recipe's tokenizer vocabulary
    lengths: tuple[int, ...]
    tokens_per_step: int
    steps: int  # timed steps, after two warm-up steps (compilation happens there)
    rounds: int  # bare loop and trainer measured this many times, alternately; each keeps its fastest round
    loss_length: int  # L of the loss-kernel rows (each kernel in the bare loop)


GPU = Setting("models/{arch}-bookcorpus.yaml", 8000, (1024, 4096, 16384, 65536, 131072), 65536, 10, 1, 4096)
# Shared CPUs slow down by a third for minutes at a time (other load on the host): two alternating
# rounds, so that the bare loop and the trainer are each compared at their least disturbed.
CPU = Setting("models/{arch}-tiny.yaml", 0, (256, 1024), 4096, 5, 2, 1024)


def model_config(recipe_path: str, vocab_size: int):
    recipe = load_recipe(recipe_path)
    vocab = vocab_size or recipe.data.tokenizer.vocab_size
    return dataclasses.replace(recipe.model, vocab_size=vocab)


def build(name: str, cfg, seq_len: int):
    """The model `name`: an msllm arch, or "hf_llama", LlamaForCausalLM at vanilla's dimensions
    behind msllm's model interface (so that the bare step gives it the same loss)."""
    if name != "hf_llama":
        return build_model(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 (optional: transformers, the [hf] extra)

    scale = cfg.scales[0]
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=scale.layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )

    class HFLlama(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llama = LlamaForCausalLM(hf)
            self.lm_head = self.llama.lm_head

        def forward(self, input_ids, loss=None, auxiliary=True):
            # `auxiliary` is msllm's model_loss contract (dynamic chunking's ratio loss): Llama has none.
            hidden = self.llama.model(input_ids=input_ids, use_cache=False).last_hidden_state
            return self.lm_head(hidden) if loss is None else loss(hidden, self.lm_head.weight)

    return HFLlama()


def dispatched_ops(step) -> int:
    """The aten operator calls `step()` dispatches (see the module's docstring), compiled code's
    runtime calls included, its compilation excluded."""

    class Counter(TorchDispatchMode):
        count = 0

        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True  # off while torch.compile traces, on while its compiled code runs

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with counter:
        step()
    return counter.count


def measure(
    name: str,
    recipe_path: str,
    vocab_size: int,
    seq_len: int,
    tokens_per_step: int,
    steps: int,
    compiled: bool,
    loss_kernel: str = "auto",
) -> dict:
    """Train `steps` steps (after two warm-up steps) in a bare loop; tokens/s over those steps
    (waiting for the device once, at the end, as `msllm train` between two log rows), MFU and peak
    memory. Compiled: msllm's models block by block, as `train.compile` does (so that the ratio to
    the trainer measures the trainer, not the compile granularity); Llama as a whole. The loss is
    msllm's, with `loss_kernel` resolved as the trainer resolves it."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    kernel = choose_kernel(loss_kernel, device.type)
    cfg = model_config(recipe_path, vocab_size)
    torch.manual_seed(0)
    model = build(name, cfg, seq_len)
    model.to(device)
    if compiled and name == "hf_llama":
        model = torch.compile(model)
    elif compiled:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    batch = max(1, tokens_per_step // seq_len)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)

    def step():
        bare_step(model, optimizer, ids[:, :-1], ids[:, 1:], torch.bfloat16 if cuda else None, kernel)

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    tokens_per_s = steps * batch * seq_len / (time.perf_counter() - start)
    # One more forward + loss + backward, without the optimizer: the operations it dispatches.
    ops = dispatched_ops(
        lambda: bare_step(model, None, ids[:, :-1], ids[:, 1:], torch.bfloat16 if cuda else None, kernel)
    )
    optimizer.zero_grad(set_to_none=True)
    peak, _ = peak_flops(device)  # what `msllm train` computes its MFU against
    return {
        "model": name,
        "mode": "compiled" if compiled else "eager",
        "loop": "bare",
        "L": seq_len,
        "batch": batch,
        "loss": kernel,
        "tokens_per_s": tokens_per_s,
        "ops_per_step": ops,
        "mfu": flops_per_token(cfg, seq_len) * tokens_per_s / peak,
        "peak_gib": (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) / 2**30,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def run_in_fresh_process(kwargs: dict) -> dict:
    """`measure(**kwargs)` in its own process; a failure (e.g. out of memory) becomes a row saying so."""
    code = (
        "import json,sys; from msllm.bench.throughput import measure; "
        "print(json.dumps(measure(**json.loads(sys.argv[1]))))"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "model": kwargs["name"],
        "mode": "compiled" if kwargs["compiled"] else "eager",
        "loop": "bare",
        "L": kwargs["seq_len"],
        "loss": kwargs.get("loss_kernel", "auto"),
        "error": failure(proc),
    }


def failure(proc: subprocess.CompletedProcess) -> str:
    """What a failed row's process died of: "out of memory", or its last line of stderr."""
    error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return "out of memory" if "out of memory" in error.lower() else error[:120]


def measure_trainer(
    name: str,
    recipe_path: str,
    vocab_size: int,
    seq_len: int,
    tokens_per_step: int,
    steps: int,
    compiled: bool,
    loss_kernel: str = "auto",
) -> dict:
    """`msllm train` for 2 x `steps` steps in a fresh process, logging every `steps` steps (as a
    run logs); tokens/s, MFU and peak memory of its last row: its last `steps` steps, the first
    `steps` having compiled and warmed up."""
    cuda = torch.cuda.is_available()
    vocab = vocab_size or model_config(recipe_path, 0).vocab_size
    batch = max(1, tokens_per_step // seq_len)
    row = {
        "model": name,
        "mode": "compiled" if compiled else "eager",
        "loop": "msllm train",
        "L": seq_len,
        "batch": batch,
        "loss": choose_kernel(loss_kernel, "cuda" if cuda else "cpu"),
    }
    with tempfile.TemporaryDirectory(prefix="msllm-throughput-") as out:
        settings = {
            "run.output_dir": out,
            "data.source": "wikipedia-sample",
            "data.paths": "[]",
            "data.shards_dir": f"data/throughput-{vocab}-{seq_len}",
            "data.seq_len": seq_len,
            "data.tokenizer.vocab_size": vocab,
            "model.vocab_size": 0,
            "parallel.zero_stage": 0,
            "train.micro_batch_size": batch,
            "train.grad_accum_steps": 1,
            "train.max_steps": 2 * steps,
            "train.warmup_steps": 0,
            "train.compile": str(compiled).lower(),
            "train.precision": "bf16" if cuda else "fp32",
            "log.every": steps,
            "log.tensorboard": "false",
            "eval.every": 0,
            "eval.max_batches": 1,
            "checkpoint.every": 0,
            "checkpoint.keep_last": 1,
            "train.loss_kernel": loss_kernel,
        }
        cmd = [
            sys.executable,
            "-m",
            "msllm.cli",
            "train",
            recipe_path,
            *[x for k, v in settings.items() for x in ("--set", f"{k}={v}")],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {**row, "error": failure(proc)}
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in logged if r["kind"] == "train"][-1]
    memory = last.get("accel_max_allocated_bytes") or last["peak_rss_bytes"]
    return {**row, "tokens_per_s": last["tokens_per_s"], "mfu": last["mfu"], "peak_gib": memory / 2**30}


def rows_for(setting: Setting, models=(*ARCHS, "hf_llama"), modes=(False, True)) -> list[dict]:
    """Every (model, L, mode) in the bare loop, and for msllm's models in `msllm train` too, with
    the loss the trainer chooses; then the loss kernels against each other (loss_rows)."""
    rows = []
    for name in models:
        recipe = shipped_recipe(
            setting.recipes.format(arch=llama_arch() if name == "hf_llama" else name)
        )  # Llama: its msllm twin's recipe
        for seq_len in setting.lengths:
            for compiled in modes:
                kwargs = dict(
                    name=name,
                    recipe_path=recipe,
                    vocab_size=setting.vocab_size,
                    seq_len=seq_len,
                    tokens_per_step=setting.tokens_per_step,
                    steps=setting.steps,
                    compiled=compiled,
                )
                rows += best_of_rounds(kwargs, setting.rounds, trainer=name != "hf_llama")
    return rows


def best_of_rounds(kwargs: dict, rounds: int, trainer: bool) -> list[dict]:
    """The bare loop (and `msllm train` if `trainer`) for one setting, `rounds` times alternately;
    each loop's fastest round."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        found = [run_in_fresh_process(kwargs)]
        if trainer:
            found.append(measure_trainer(**kwargs))
        for row in found:
            print(json.dumps(row), flush=True)
            kept = best.get(row["loop"])
            if kept is None or "error" in kept or row.get("tokens_per_s", 0) > kept.get("tokens_per_s", 0):
                best[row["loop"]] = row
    return list(best.values())


def loss_kernels(cuda: bool) -> tuple[str, ...]:
    """The loss kernels that can run here: dense and chunked everywhere, the fused ones on CUDA
    where their libraries are installed."""
    return ("dense", "chunked") + tuple(k for k in ("liger", "cce") if cuda and installed(k))


def loss_rows(setting: Setting, cuda: bool) -> list[dict]:
    """vanilla and bottom_up, eager, at the setting's loss length, in the bare loop with each loss kernel."""
    rows = []
    for name in ("vanilla", "bottom_up"):
        for kernel in loss_kernels(cuda):
            kwargs = dict(
                name=name,
                recipe_path=shipped_recipe(setting.recipes.format(arch=name)),
                vocab_size=setting.vocab_size,
                seq_len=setting.loss_length,
                tokens_per_step=setting.tokens_per_step,
                steps=setting.steps,
                compiled=False,
                loss_kernel=kernel,
            )
            rows += best_of_rounds(kwargs, setting.rounds, trainer=False)
    return rows


def table(rows: list[dict], setting: Setting) -> str:
    lines = [
        (
            f"Each loop ran {setting.rounds} times, alternately; the faster run of each is shown. "
            if setting.rounds > 1
            else ""
        )
        + f"{setting.tokens_per_step} tokens per step (or one sample); bare loop: {setting.steps} timed steps after 2 "
        f"warm-up steps; `msllm train`: its last {setting.steps} of {2 * setting.steps} steps (one log row). "
        "Compiled: each transformer block, as `train.compile` does, in both loops; Llama as a whole. Models "
        f"from `recipes/{setting.recipes}`"
        + (f", vocabulary {setting.vocab_size}" if setting.vocab_size else "")
        + ". "
        "Peak memory: CUDA max_memory_allocated, or the process's peak RSS on the CPU. MFU against the peak "
        '`msllm train` uses (msllm.metrics.peak_flops). "train / bare": the trainer\'s tokens/s over the '
        'bare loop\'s for the same model, L and mode. "ops/step" (bare loop): the aten operations one forward + '
        "loss + backward dispatches (msllm.bench.throughput.dispatched_ops; compiled: those the compiled code still "
        "dispatches).",
        "",
        "| model | mode | loop | loss | L | batch | tokens/s | train / bare | MFU | peak GiB | ops/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bare = {
        (r["model"], r["mode"], r["L"], r.get("loss")): r for r in rows if r.get("loop") == "bare" and "error" not in r
    }
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['loop']} | {r.get('loss', '')} | {r['L']} "
                f"| | {r['error']} | | | | |"
            )
            continue
        ref = bare.get((r["model"], r["mode"], r["L"], r.get("loss")))
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if r["loop"] != "bare" and ref else ""
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['loop']} | {r.get('loss', '')} | {r['L']} | {r['batch']} | "
            f"{r['tokens_per_s']:,.0f} | {ratio} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} | "
            f"{r['ops_per_step'] if 'ops_per_step' in r else ''} |"
        )
    return "\n".join(lines)


LOOP_COLORS = {"bare": "tab:blue", "msllm train": "tab:orange"}
MODE_STYLES = {"eager": "-", "compiled": "--"}
TARGET = 0.95  # msllm train's tokens/s over the bare loop's, at least (issue 10)


def figure(rows: list[dict], title: str):
    """One column per model: tokens/s against L (bare loop and msllm train, eager and compiled),
    the trainer's tokens/s over the bare loop's, and peak memory (linear axes, from 0). Failed rows
    are left out (the table names them)."""
    ok = [r for r in rows if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    lengths = [r["L"] for r in ok]
    fig, axes = plotting.new_figure(3.0 * len(models) + 1, 8.5, nrows=3, ncols=len(models), sharex=True, sharey="row")
    for col, model in enumerate(models):
        speed, ratio, memory = axes[:, col]
        speed.set_title(model)
        mine = [r for r in ok if r["model"] == model]
        bare = {(r["mode"], r["L"]): r["tokens_per_s"] for r in mine if r["loop"] == "bare"}
        for loop in LOOP_COLORS:
            for mode in MODE_STYLES:
                series = sorted((r for r in mine if (r["loop"], r["mode"]) == (loop, mode)), key=lambda r: r["L"])
                if not series:
                    continue
                style = dict(color=LOOP_COLORS[loop], linestyle=MODE_STYLES[mode], marker="o", label=f"{loop}, {mode}")
                Ls = [r["L"] for r in series]
                speed.plot(Ls, [r["tokens_per_s"] for r in series], **style)
                memory.plot(Ls, [r["peak_gib"] for r in series], **style)
                compared = [r for r in series if loop != "bare" and (mode, r["L"]) in bare]
                if compared:
                    ratio.plot(
                        [r["L"] for r in compared],
                        [r["tokens_per_s"] / bare[(mode, r["L"])] for r in compared],
                        **style,
                    )
        if ratio.lines:
            ratio.axhline(TARGET, color="grey", linestyle=":", label=f"target {TARGET}x")
        else:
            ratio.text(
                0.5,
                0.5,
                "bare loop only\n(no msllm train run)",
                transform=ratio.transAxes,
                ha="center",
                va="center",
                color="grey",
            )
        for ax in (speed, ratio, memory):
            plotting.length_axis(ax, lengths)
            ax.grid(alpha=0.3)
        memory.set_xlabel("sequence length L (tokens)")
    for ax, label in zip(
        axes[:, 0], ("training tokens/s", "msllm train / bare loop\n(tokens/s ratio)", "peak memory (GiB)")
    ):
        ax.set_ylabel(label)
    for row, key in ((0, "tokens_per_s"), (2, "peak_gib")):  # from 0, to above every model's highest point
        axes[row, 0].set_ylim(0, 1.08 * max(r[key] for r in ok))
    fig.suptitle(title)
    plotting.legend_outside(fig, ncols=5)
    return fig


def plot(rows: list[dict], path: Path, title: str) -> Path:
    return plotting.save(figure(rows, title), path)


def rows_from_markdown(section: str) -> list[dict]:
    """The rows of the table that `table` wrote (the registry's section of benchmarks/throughput.md)."""
    rows = []
    for cell in table_rows(section):
        row = {"model": cell["model"], "mode": cell["mode"], "loop": cell.get("loop", "bare"), "L": int(cell["L"])}
        if not cell["batch"]:  # a failed row: its error is in the tokens/s column
            rows.append({**row, "error": cell["tokens/s"]})
            continue
        rows.append(
            {
                **row,
                "batch": int(cell["batch"]),
                "tokens_per_s": number(cell["tokens/s"]),
                "mfu": number(cell["MFU"]),
                "peak_gib": number(cell["peak GiB"]),
            }
        )
    return rows


def replot(out: Path) -> Path:
    """benchmarks/throughput.png again from the newest table in out/throughput.md (no measuring)."""
    section = last_section((out / "throughput.md").read_text())
    device = "CPU" if "-tiny.yaml" in section else "GPU"
    return plot(rows_from_markdown(section), out / "throughput.png", title(device))


def title(device: str) -> str:
    return f"Training throughput and memory: msllm train against the bare loop ({device})"


def bench_throughput(args) -> str:
    cuda = torch.cuda.is_available()
    setting = GPU if cuda else CPU
    rows = rows_for(setting)
    kernels = loss_rows(setting, cuda)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    plot(rows, Path(args.out) / "throughput.png", title(device))
    return (
        table(rows, setting) + "\n\n![throughput](throughput.png)\n\n"
        f"The loss kernels against each other (bare loop, eager, L={setting.loss_length}; msllm.train.loss):\n\n"
        + table(kernels, setting)
    )
