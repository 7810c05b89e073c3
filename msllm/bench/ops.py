"""`msllm bench ops`: the operations one training step dispatches, per architecture, at the
BookCorpus recipes' sizes (recipes/models/*-bookcorpus.yaml, vocabulary 8000, as `msllm bench
throughput` measures on a GPU), eager and compiled: counted, not timed, so it runs on any machine
in minutes.

A step here is forward + loss + backward, as in the ops/step column of `msllm bench throughput`
(msllm.bench.throughput.dispatched_ops: every aten operator call that reaches torch's
dispatcher; compiled, what the compiled code still dispatches, not what inductor fused). Each
dispatch costs host time, and on a GPU at least one kernel launch, so this is the count that
compilation, fusion and CUDA graphs have to bring down: on the H100 (2026-11-23) the multi-scale
models were host-bound at short contexts (issue 31).

The count depends on the layers and barely on L or the batch (the chunked loss adds a few
operations per chunk of positions), so one short length and a small batch give it: L = 256, batch
4 (1,024 positions, one chunk of the chunked loss at vocabulary 8000). Compiled means each block
compiled as `train.compile` does, with inductor; two steps compile and warm up before the counted
one, and the gradients are cleared before it (a step that creates them, as after an optimizer
step). The attention and loss kernels are the ones the device picks (on the CPU: blocks and
chunked; on CUDA: FlexAttention and the fused loss where installed), so compare counts of one
device only.
"""

from __future__ import annotations

import torch

from msllm.bench import shipped_recipe
from msllm.bench.throughput import GPU, build, dispatched_ops, model_config
from msllm.distributed.parallelize import BLOCKS, compile_blocks
from msllm.models.registry import ARCHS
from msllm.train.bare import bare_step
from msllm.train.loss import choose_kernel

OPS_LENGTH = 256
OPS_BATCH = 4


def count_ops(name: str, recipe_path: str, vocab_size: int, seq_len: int, batch: int, compiled: bool) -> dict:
    """The operations one forward + loss + backward of the model of `recipe_path` dispatches (after
    two warm-up steps), with its layer count (the blocks compile_blocks compiles) and the count per
    layer."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    kernel = choose_kernel("auto", device.type)
    cfg = model_config(recipe_path, vocab_size)
    torch.manual_seed(0)
    model = build(name, cfg, seq_len).to(device)
    if compiled:
        compile_blocks(model)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)

    def step():
        bare_step(model, None, ids[:, :-1], ids[:, 1:], torch.bfloat16 if cuda else None, kernel)

    for _ in range(2):
        step()
    model.zero_grad(set_to_none=True)
    ops = dispatched_ops(step)
    layers = sum(isinstance(m, BLOCKS) for m in model.modules())
    return {
        "model": name,
        "mode": "compiled" if compiled else "eager",
        "layers": layers,
        "loss": kernel,
        "ops_per_step": ops,
        "ops_per_layer": ops / layers,
    }


def table(rows: list[dict], seq_len: int, batch: int, device: str) -> str:
    eager = {r["model"]: r["ops_per_step"] for r in rows if r["mode"] == "eager"}
    vanilla = eager.get("vanilla")
    lines = [
        f"Operations dispatched by one forward + loss + backward (no optimizer step), L = {seq_len}, batch {batch}, "
        f"on the {device}; models from `recipes/{GPU.recipes}`, vocabulary {GPU.vocab_size} "
        "(msllm.bench.ops; counted by msllm.bench.throughput.dispatched_ops after two warm-up steps). "
        "Compiled: each block compiled with inductor, as `train.compile` does; the count is what its code "
        "still dispatches. Per layer: the step's count over the number of blocks.",
        "",
        "| model | layers | loss | eager ops/step | per layer | x vanilla | compiled ops/step | per layer "
        "| compiled / eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        e = next(r for r in rows if r["model"] == name and r["mode"] == "eager")
        c = next((r for r in rows if r["model"] == name and r["mode"] == "compiled"), None)
        cells = [f"{name}-{e['layers']}", e["layers"], e["loss"], f"{e['ops_per_step']:,}", f"{e['ops_per_layer']:.0f}"]
        cells.append(f"{e['ops_per_step'] / vanilla:.2f}x" if vanilla else "")
        if c is None:
            cells += ["", "", ""]
        else:
            cells += [
                f"{c['ops_per_step']:,}",
                f"{c['ops_per_layer']:.0f}",
                f"{c['ops_per_step'] / e['ops_per_step']:.2f}",
            ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def bench_ops(args) -> str:
    cuda = torch.cuda.is_available()
    rows = []
    for name in ARCHS:
        recipe = shipped_recipe(GPU.recipes.format(arch=name))
        for compiled in (False, True):
            row = count_ops(name, recipe, GPU.vocab_size, OPS_LENGTH, OPS_BATCH, compiled)
            print(row, flush=True)
            rows.append(row)
    return table(rows, OPS_LENGTH, OPS_BATCH, torch.cuda.get_device_name() if cuda else "CPU")
