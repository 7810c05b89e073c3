"""The model zoo: `build_model(model_cfg)` returns a plain `torch.nn.Module` whose
`forward(input_ids [B, L]) -> logits [B, L, vocab]` works for any L >= 1.

    vanilla    the Llama-layout baseline                       (vanilla/)
    bottom_up  local token layers, pooled up, scales combined  (bottom_up/)
    top_down   coarsest scale first, refined down to tokens    (top_down/)
    retina     one stack, attention ever coarser with distance (retina/)

Each architecture is a folder (its model, its own config fields, its spec: spec.py) listed in
registry.py. Shared blocks live in layers.py, attention.py, chunking.py, mamba2.py. Parallelism and activation
checkpointing are applied from outside (msllm.distributed.parallelize).
"""

from __future__ import annotations

import torch
from torch import nn

from msllm.models.init import init_parameters, materialise, parameters_on_meta
from msllm.models.registry import SPECS

MODELS = {name: s.model for name, s in SPECS.items()}


def build_model(cfg, seed: int | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Build the architecture `cfg.arch` (a validated `ModelConfig` with vocab_size set) on
    `device` (default: torch's default device, so that `with torch.device("meta")` builds a model
    with no storage), initialised from `seed` (msllm.models.init: the same weights on any device,
    world size or ZeRO stage; None draws the seed from torch's global generator, so that
    torch.manual_seed still decides). The parameters are built on the meta device and
    materialised once, on `device`: no copy of the model is made anywhere else."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))
    with parameters_on_meta():
        model = construct(cfg)
    materialise(model, device)
    if device.type != "meta":
        init_parameters(model, seed)
    return model


def construct(cfg) -> nn.Module:
    """The module of `cfg.arch` as its constructor leaves it (torch's default init, or partitions
    under deepspeed.zero.Init): build_model and the ZeRO-3 build (msllm.train.engine) start here."""
    if cfg.vocab_size < 1:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer) before building")
    return MODELS[cfg.arch](cfg)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) at sequence length `seq_len`.

    Counted by torch's FlopCounterMode on a forward pass of a model built on the meta device, so it
    covers every matmul and attention of the architecture as it is actually computed (local and
    retina attention count their whole blocks of keys, masked ones included).
    """
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415 (start-up: 80 ms that only FLOP counts need)

    with torch.device("meta"):
        model = construct(cfg)
        input_ids = torch.zeros(1, seq_len, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids)
    return 3.0 * counter.get_total_flops() / seq_len
