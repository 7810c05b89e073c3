"""The optimizer and the engine: AdamW parameter groups, the learning-rate schedule, the DeepSpeed
config, all from the recipe, and `build_engine`, which wraps the parallel model
(msllm.distributed.parallelize) in DeepSpeed with them."""

from __future__ import annotations

import math

import torch

from msllm.models import build_model, construct
from msllm.models.init import init_parameters
from msllm.train.nonfinite import GuardedAdamW


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float | None = None, lr_multipliers: list[float] | None = None
) -> list[dict]:
    """AdamW groups: weight matrices and embeddings decay; norms, biases and Mamba-2's per-head
    parameters (ndim < 2) do not. Without `lr_multipliers`: two groups, decay then no decay. With
    them (one per scale, train.lr_multipliers): one group per (decay, scale) that has parameters,
    the decaying ones first, each in scale order, with lr = `lr` times its scale's multiplier
    (model.parameter_scale names each parameter's scale); the LambdaLR schedule then scales each
    group's own rate. The multipliers are recorded on the model (`lr_multipliers`) so that
    param_names(model) lists the parameters in the same order."""
    model.lr_multipliers = list(lr_multipliers) if lr_multipliers else None
    groups = []
    for decays, scale, named in _grouped(model):
        group = {"params": [p for _, p in named], "weight_decay": weight_decay if decays else 0.0}
        if scale is not None:
            group.update(lr=lr * lr_multipliers[scale], lr_multiplier=lr_multipliers[scale], scale=scale)
        groups.append(group)
    return groups


def param_names(model: torch.nn.Module) -> list[str]:
    """The parameters' names in the optimizer's order (param_groups', with the multipliers it
    recorded on the model), which indexes torch's optimizer state: what converting a ZeRO-0
    checkpoint needs (msllm.checkpoint.reshard)."""
    return [name for _, _, named in _grouped(model) for name, _ in named]


def _grouped(model: torch.nn.Module) -> list[tuple[bool, int | None, list]]:
    """(decays, scale or None, [(name, parameter)]) per optimizer group, in order, empty ones left
    out but for the first (the decaying weights, always there)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions keep the full shape in ds_shape
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 else no_decay).append((name, p))
    multipliers = getattr(model, "lr_multipliers", None)
    if not multipliers:
        return [(True, None, decay)] + ([(False, None, no_decay)] if no_decay else [])
    groups = []
    for decays, named in ((True, decay), (False, no_decay)):
        for scale in range(len(multipliers)):
            members = [(n, p) for n, p in named if model.parameter_scale(n) == scale]
            if members:
                groups.append((decays, scale, members))
    return groups


def lr_multipliers(recipe) -> list[float] | None:
    """train.lr_multipliers, or H-Net's when a scale is dynamic and none are given
    (ModelConfig.default_lr_multipliers), or None: one rate for every parameter, the two groups of
    before (also when every given multiplier is 1.0, as a run started before them resumes)."""
    given = list(recipe.train.lr_multipliers)
    if given and all(m == 1.0 for m in given):
        return None
    return given or recipe.model.default_lr_multipliers()


def lr_at(step: int, train_cfg) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses lr_at(0)).

    Linear warmup from lr/warmup to lr over `warmup_steps` updates, then cosine or linear decay to
    `min_lr` at `max_steps` (or constant)."""
    lr, min_lr, warmup, total = train_cfg.lr, train_cfg.min_lr, train_cfg.warmup_steps, train_cfg.max_steps
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return lr
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if train_cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return min_lr + (lr - min_lr) * factor


def build_optimizer(model: torch.nn.Module, recipe, device_name: str) -> torch.optim.Optimizer:
    """AdamW over param_groups' groups (two, or per scale with train.lr_multipliers). With optimizer offload on an
    accelerator, DeepSpeed's CPU Adam (its AdamW mode); otherwise torch's AdamW, which needs no compiled op
    and is deterministic: on CUDA its fused kernel (one launch for all parameters, as in the bare loop `msllm bench
    throughput` compares with), elsewhere its multi-tensor (foreach) form."""
    t = recipe.train
    groups = param_groups(model, t.weight_decay, t.lr, lr_multipliers(recipe))
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    if recipe.parallel.offload_optimizer and device_name != "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415 (heavy: DeepSpeed)

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)

    return GuardedAdamW(groups, fused=device_name == "cuda", **kwargs)  # AdamW that never applies a non-finite update


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that DeepSpeed steps after every optimizer update and saves in its checkpoints. It
    multiplies each group's own initial rate (train.lr times the group's lr_multiplier) by
    lr_at(step) / lr: every scale follows the same warmup and decay, min_lr scaled alike."""
    peak = train_cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train_cfg) / peak)


def deepspeed_config(recipe) -> dict:
    """The DeepSpeed config dict for this recipe (optimizer and scheduler are passed as objects)."""
    t, par = recipe.train, recipe.parallel
    zero: dict = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if par.zero_stage == 3:
        # Keep the exchange buckets small: the models here are small, and CPU ranks share memory.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e7})
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        # The optimizer is torch's AdamW (or DeepSpeedCPUAdam when offloading on an accelerator).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return cfg


def build_model_for_training(recipe, device: torch.device) -> torch.nn.Module:
    """The recipe's model, initialised from run.seed (msllm.models.init: the same weights on any
    world size and ZeRO stage), built where it trains, with no whole copy anywhere else:

    - ZeRO-3: inside deepspeed.zero.Init, which partitions each module's parameters as soon as the
      module is built, so a rank holds its partition of the model (and, for a moment, one module
      whole); each rank then writes its slices of the initial values (init.assign);
    - ZeRO 0-2 (every rank holds the weights): on the meta device, then materialised on `device`.
    """
    if recipe.parallel.zero_stage == 3:
        import deepspeed  # noqa: PLC0415 (heavy: DeepSpeed)

        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(recipe)):
            model = construct(recipe.model)
        init_parameters(model, recipe.run.seed)
        return model
    return build_model(recipe.model, seed=recipe.run.seed, device=device)


def build_engine(model: torch.nn.Module, recipe, dims):
    """The DeepSpeed engine around the parallel model: ZeRO stage 0-3 over all ranks, AdamW and
    the learning-rate schedule; gradients averaged over all dp * sp ranks. Collective."""
    import deepspeed  # noqa: PLC0415 (heavy: DeepSpeed)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (heavy: DeepSpeed)

    if recipe.parallel.zero_stage == 3:
        # The loss reads the head's weight in the model's own forward, outside lm_head.forward
        # (msllm.train.loss never computes all the logits): ZeRO-3 must gather it there too.
        deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
    optimizer = build_optimizer(model, recipe, get_accelerator().device_name())
    scheduler = build_scheduler(optimizer, recipe.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(recipe)
    )
    if dims.world_size == 1 and recipe.parallel.zero_stage == 0:
        # One rank has nothing to average, but DeepSpeed would still copy every gradient through
        # flat buffers and an all-reduce after each backward (2% of a step, measured on the CPU).
        engine.enable_backward_allreduce = False
    return engine
