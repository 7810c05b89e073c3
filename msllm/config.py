"""Typed recipes: every field is defined, typed and documented here, and validated before anything runs.

A recipe is a YAML file with the sections below. `load_recipe` reads it (following `base:` chains),
applies `section.key=value` overrides, checks every key and type, and checks that the values agree
with each other. Any problem is one `RecipeError` line naming the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from msllm.errors import RecipeError, clip, short_repr


def doc(default: Any, help: str, required: bool = False) -> Any:
    """A dataclass field with its documentation attached (listed by `msllm show-config --docs`).

    `required` fields keep `default` only so that the dataclass can be built in code; a recipe
    that does not set them is rejected.
    """
    metadata = {"help": help, "required": required}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        # Mutable defaults: each instance gets its own copy.
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# Bounds no recipe needs to reach, so that a typo fails at load time instead of as an allocation of
# terabytes or an integer overflow deep inside torch or mosaicml-streaming.
MAX_SEQ_LEN = 1 << 24
SEED_LIMIT = 1 << 63  # torch takes seeds below 2**64, streaming none below 0; the trainer adds per-rank offsets
SPECIAL_PIECES = 4  # pad, unk, bos, eos: every tokenizer msllm trains has them (msllm.data.tokenizer)
BYTE_PIECES = 256  # one per byte value, with byte_fallback
BYTES_VOCAB_SIZE = SPECIAL_PIECES + BYTE_PIECES  # data.tokenizer.type bytes (msllm.data.tokenizer.ByteTokenizer)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = doc("run", "Name of the run, used in logs and as the TensorBoard run name.")
    output_dir: str = doc(
        "runs/run",
        "Folder for checkpoints, metrics.jsonl, TensorBoard events and the resolved recipe. "
        "Relative paths are relative to the working directory.",
    )
    seed: int = doc(1234, "Seed for parameter init, data shuffling, and every RNG in training (0 <= seed < 2**63).")


@dataclass
class TokenizerConfig:
    model: str | None = doc(
        None,
        "Path to an existing sentencepiece .model to reuse. If unset, one is trained on the train "
        "split and saved next to the shards.",
    )
    type: Literal["unigram", "bpe", "bytes"] = doc(
        "unigram",
        "sentencepiece model type when training one, or `bytes`: byte-level data, UTF-8 byte b as "
        "id 4 + b after the 4 special ids (260 ids), no tokenizer to train (the other tokenizer "
        "fields are then not read).",
    )
    vocab_size: int = doc(
        8000,
        "Vocabulary size when training a tokenizer: at least the 4 special pieces, the 256 byte "
        "pieces with byte_fallback, and one piece per character of the corpus (`msllm prep` names "
        "the exact minimum; 362 for the built-in wikipedia-sample). Type bytes: always 260.",
    )
    byte_fallback: bool = doc(True, "Map unknown characters to UTF-8 byte pieces instead of <unk>.")
    character_coverage: float = doc(
        0.9995, "Fraction of characters the vocabulary must cover (0.98 to 1, sentencepiece's range)."
    )
    input_sentence_size: int = doc(
        1_000_000, "At most this many sentences are sampled from the corpus to train the tokenizer (0: all)."
    )

    def data_vocab_size(self) -> int:
        """The vocabulary the data will have: 260 for bytes, else the trained tokenizer's size."""
        return BYTES_VOCAB_SIZE if self.type == "bytes" else self.vocab_size


@dataclass
class DataConfig:
    source: Literal["wikipedia-sample", "text", "jsonl", "shards"] = doc(
        "wikipedia-sample",
        "Where documents come from: the built-in Wikipedia sample (from gensim's test data), text "
        "files, jsonl files, or already-written shards (`shards_dir` only).",
    )
    paths: list[str] = doc([], "Files or glob patterns for the `text` and `jsonl` sources.")
    text_field: str = doc("text", "Field holding the document text in jsonl records.")
    split_on_blank_lines: bool = doc(
        False, "Text source: split each file into documents at blank lines (else one per file)."
    )
    on_decode_error: Literal["fail", "skip"] = doc(
        "fail", "What to do with bytes that are not UTF-8: stop with an error, or skip the document."
    )
    validation_fraction: float = doc(
        0.05, "Fraction of documents (chosen by a hash of their text) held out for validation."
    )
    shards_dir: str = doc(
        "data/wikipedia-sample",
        "Folder of the MDS shards: `train/`, `validation/`, `manifest.json`, the tokenizer.",
    )
    seq_len: int = doc(
        1024,
        "Training sequence length L; shards hold windows of L+1 tokens (inputs and labels). "
        f"At most {MAX_SEQ_LEN:,} (2**24).",
    )
    tokenizer: TokenizerConfig = doc(TokenizerConfig(), "The tokenizer: sentencepiece, or bytes.")
    workers: int = doc(2, "Worker processes that tokenize during `msllm prep`.")
    prep_checkpoint_bytes: int = doc(
        1 << 28,
        "`msllm prep` saves its progress after about this many bytes of text (one MDS sub-folder "
        "per split each time): rerun after an interruption, it continues from the last save.",
    )
    shard_size_limit: int = doc(
        1 << 26,
        "Upper bound on the bytes of one MDS shard: at least one sample (4 * (seq_len + 1) bytes), "
        "below 2**32 (mosaicml-streaming's limit).",
    )
    shuffle: bool = doc(True, "Shuffle training samples (deterministically, from run.seed).")
    num_workers: int = doc(0, "DataLoader worker processes per rank during training.")
    num_canonical_nodes: int = doc(
        0,
        "streaming's number of canonical nodes, which fixes the global order of the training samples "
        "whatever the number of ranks (elastic determinism): a run resumes on any number of ranks on a "
        "number of nodes that divides it or that it divides. 0: the number of nodes of the run's first "
        "start (streaming's default). It is recorded in every checkpoint and cannot change within a run.",
    )
    cache_dir: str = doc(
        "",
        "Local folder where each training job keeps its copy of the shards it reads (copied or "
        "downloaded from shards_dir, then decompressed there; shards_dir is never written to). "
        "Empty means msllm-data-cache under the system temp dir. It must be empty or absent when "
        "first used: msllm marks it as its own (.msllm-cache) and removes only what it marked.",
    )


@dataclass
class ScaleConfig:
    factor: int = doc(1, "Pooling factor k_s from the next finer scale to this one (1 for the token scale).")
    layers: int = doc(2, "Transformer layers at this scale.")
    attention: Literal["local", "full"] = doc(
        "full", "Causal sliding-window attention over `window` tokens, or full causal attention."
    )
    window: int = doc(128, "Window w of local attention (and of retina's fine level).")
    pool: Literal["fixed", "dynamic"] = doc(
        "fixed",
        "How this scale is made from the next finer one: fixed causal pooling by `factor`, or "
        "`dynamic`: learned chunk boundaries after H-Net (bottom_up, the coarsest scale only; "
        "msllm.models.chunking). A dynamic scale leaves `factor` at 1 and sets `target_ratio`.",
    )
    target_ratio: float = doc(
        4.0, "pool dynamic: the compression (finer positions per chunk) the ratio loss aims at (> 1)."
    )
    ratio_loss_weight: float = doc(
        0.03, "pool dynamic: weight alpha of H-Net's ratio loss, added to the per-token LM loss (>= 0)."
    )
    boundaries: Literal["learned", "fixed"] = doc(
        "learned",
        "pool dynamic: where chunks end. `learned`: where the router's p >= 0.5 (H-Net). `fixed`: every "
        "target_ratio positions (an integer then), as fixed pooling cuts, while p stays the router's for the "
        "EMA and the straight-through confidence: an ablation that keeps dynamic chunking's selection, EMA "
        "and STE and fixes only where chunks end (python -m lab bytes).",
    )
    mixer: Literal["attention", "mamba2"] = doc(
        "attention",
        "What mixes positions in this scale's layers: `attention` (transformer blocks: attention and "
        "SwiGLU), or `mamba2`: Mamba-2 (SSD) blocks, norm -> Mamba-2 mixer -> residual, no MLP (H-Net's "
        "`m` layers; msllm.models.mamba2, sizes in model.mamba; `attention` and `window` are then not "
        "read). Bottom-up's final layers take scale 0's mixer. bottom_up and top_down only (not "
        "vanilla, which exports as Llama, nor retina); not under sequence parallelism yet (parallel.sp "
        "must be 1).",
    )


@dataclass
class MambaConfig:
    d_state: int = doc(128, "Mamba-2: state size N per head (H-Net's ssm_cfg: 128).")
    d_conv: int = doc(4, "Mamba-2: width of the short causal depthwise convolution (H-Net: 4).")
    expand: int = doc(2, "Mamba-2: inner width = expand * d_model (H-Net: 2).")
    head_dim: int = doc(64, "Mamba-2: width P of each head; must divide expand * d_model (Mamba-2's default: 64).")
    chunk_size: int = doc(
        256,
        "Mamba-2: positions per chunk of the SSD scan (H-Net: 256); the PyTorch scan keeps one "
        "[chunk, chunk] matrix per head and chunk.",
    )


@dataclass
class ArchConfig:
    """The fields of one architecture (its own config dataclass, msllm/models/<arch>/config.py),
    read and written flat in the model section beside the common ones, and what the common code
    asks an architecture about its shape. msllm.models.registry lists the architectures."""

    arch: ClassVar[str] = ""  # its name in recipes (model.arch)
    multi_scale: ClassVar[bool] = False  # >= 2 scales, pooled; else one stack at token resolution
    mixers: ClassVar[tuple[str, ...]] = ("attention",)  # ScaleConfig.mixer values its scales may take
    dynamic_pool: ClassVar[bool] = False  # its coarsest scale may be `pool: dynamic`
    llama: ClassVar[bool] = False  # exports (with full attention) as, and starts from, a Hugging Face Llama
    baseline: ClassVar[bool] = False  # the reference other architectures are compared with (inspect)

    def validate(self, model: ModelConfig, recipe: Recipe, fail: Callable[[str, str], None]) -> None:
        """Check its own fields, and those of `model` it reads differently; `fail(key, message)`."""

    def extra_layers(self) -> int:
        """Layers besides those of the scales (bottom_up's final layers)."""
        return 0

    def reads_window(self, scale: ScaleConfig) -> bool:
        """Whether an attention scale reads `window`: local attention does."""
        return scale.attention == "local"

    @staticmethod
    def of(arch: str) -> type:
        """The ArchConfig class of architecture `arch` (ValueError for an unknown name)."""
        known = _arch_configs()  # msllm.models.registry's (an export's configuration file defines its own)
        if arch not in known:
            raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(sorted(known))})")
        return known[arch]


@dataclass(init=False)
class ModelConfig:
    arch: str = doc(
        "vanilla",
        "Architecture: one of msllm.models.registry.ARCHS (vanilla, the Llama-layout baseline, or one of "
        "the paper's three); its own fields (msllm.models.<arch>.config) are set beside the common ones "
        "below, e.g. model.final_layers for bottom_up.",
        required=True,
    )
    vocab_size: int = doc(0, "Vocabulary size. 0 means: take it from the data's tokenizer (the usual case).")
    d_model: int = doc(256, "Width d of every scale.")
    n_heads: int = doc(4, "Attention heads; must divide d_model.")
    mlp_hidden: int = doc(0, "SwiGLU hidden width; 0 means Llama's 8/3 * d_model rounded to 64.")
    scales: list[ScaleConfig] = doc(
        [ScaleConfig()],
        "Scales from the tokens (index 0) to the coarsest. A single-stack architecture (vanilla, retina) "
        "takes one entry; a multi-scale one (bottom_up, top_down) needs >= 2.",
    )
    pooling: Literal["mean", "linear"] = doc(
        "mean", "Causal pooling: mean of each group of k, or a linear map of their concatenation."
    )
    upsampling: Literal["repeat", "linear"] = doc(
        "repeat", "Upsampling: repeat each vector k times, or a linear d -> k*d map."
    )
    rope_theta: float = doc(10000.0, "RoPE base frequency.")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = doc(False, "Share the token embedding and LM head weights.")
    init_std: float = doc(0.02, "Std of the normal init of linear and embedding weights.")
    embed_init_std: float | None = doc(
        None,
        "Std of the normal init of the token embeddings. null: 1.0 when a scale is dynamic (H-Net's "
        "init, goombalab/hnet hnet/models/mixer_seq.py init_weights), else init_std.",
    )
    mamba: MambaConfig = doc(MambaConfig(), "Sizes of the Mamba-2 layers (scales with mixer: mamba2).")
    arch_config: Any = field(
        default=None,
        metadata={
            "help": "The architecture's own fields (an ArchConfig of `arch`), read and written flat "
            "beside the common ones: not a recipe key.",
            "required": False,
            "arch_config": True,
        },
    )

    def __init__(self, *, arch_config: Any = None, **values: Any):
        """The common fields by name, the architecture's own fields by name too (as a recipe has them:
        ModelConfig(arch="retina", retina_levels=2)), or its whole ArchConfig as `arch_config` (one of
        another architecture, as dataclasses.replace(cfg, arch=...) passes, keeps what the new one shares).
        A field of neither is a TypeError naming it and the architecture."""
        common = [f for f in dataclasses.fields(ModelConfig) if f.name != "arch_config"]
        names = {f.name for f in common}
        own = {key: values.pop(key) for key in list(values) if key not in names}
        for f in common:
            if f.name in values:
                value = values[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(self, f.name, value)
        cls = ArchConfig.of(self.arch)
        mine = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(own) - mine)
        if unknown:
            raise TypeError(
                f"model.{unknown[0]} is not a field of {self.arch} "
                f"(its own fields: {', '.join(sorted(mine)) or 'none'})"
            )
        if isinstance(arch_config, cls):
            base = arch_config
        else:
            carried = (
                {n: getattr(arch_config, n) for n in mine if hasattr(arch_config, n)} if arch_config is not None else {}
            )
            base = cls(**carried)
        self.arch_config = dataclasses.replace(base, **own)

    def __getattr__(self, name: str) -> Any:
        """The architecture's own fields read as the common ones (cfg.retina_factor)."""
        arch_config = self.__dict__.get("arch_config")
        if name.startswith("__") or arch_config is None or not hasattr(arch_config, name):
            raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('arch', '?')} has no field {name}")
        return getattr(arch_config, name)

    def to_dict(self) -> dict:
        """The model section as recipes, run folders and exports hold it: the common fields, then the
        architecture's own, all flat."""
        out = {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "arch_config"
        }
        out = {
            k: dataclasses.asdict(v)
            if dataclasses.is_dataclass(v)
            else [dataclasses.asdict(i) if dataclasses.is_dataclass(i) else i for i in v]
            if isinstance(v, list)
            else v
            for k, v in out.items()
        }
        out.update(dataclasses.asdict(self.arch_config))
        return out

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return 64 * math.ceil(int(8 * self.d_model / 3) / 64)

    def cumulative_factors(self) -> list[int]:
        """f_s for each scale: the number of tokens one position of scale s stands for (a dynamic
        scale has factor 1 here: it pools the finer scale's positions by learned chunks instead)."""
        out, f = [], 1
        for s, scale in enumerate(self.scales):
            f *= scale.factor if s > 0 else 1
            out.append(f)
        return out

    def length_multiple(self) -> int:
        """Training sequence lengths must be a multiple of this (the largest cumulative factor of a
        multi-scale architecture, else 1)."""
        return self.cumulative_factors()[-1] if self.arch_config.multi_scale else 1

    def uses_window(self, scale: ScaleConfig) -> bool:
        """Whether `scale.window` is read (by local attention; the architecture may read it
        otherwise, ArchConfig.reads_window; a Mamba-2 scale reads none)."""
        return scale.mixer == "attention" and self.arch_config.reads_window(scale)

    def layer_count(self) -> int:
        """Transformer (or Mamba-2) layers of the model: every scale's, plus the architecture's own."""
        return sum(s.layers for s in self.scales) + self.arch_config.extra_layers()

    def has_dynamic_scale(self) -> bool:
        return any(scale.pool == "dynamic" for scale in self.scales)

    def embedding_init_std(self) -> float:
        """model.embed_init_std resolved (null: 1.0 with a dynamic scale, else init_std)."""
        if self.embed_init_std is not None:
            return self.embed_init_std
        return 1.0 if self.has_dynamic_scale() else self.init_std

    def compression(self) -> list[float]:
        """Tokens per position of each scale: the cumulative factors, a dynamic scale counted at its
        target ratio (what its ratio loss aims at)."""
        out, f = [], 1.0
        for s, scale in enumerate(self.scales):
            if s > 0:
                f *= scale.target_ratio if scale.pool == "dynamic" else scale.factor
            out.append(f)
        return out

    def default_lr_multipliers(self) -> list[float] | None:
        """H-Net's learning-rate multipliers per scale when a scale is dynamic, else None (one rate):
        the rate grows with the square root of the positions a stage sees per batch (and falls with
        the square root of its width, the same at every msllm scale), so scale s gets
        sqrt(compression of the coarsest / compression of s): the coarsest 1.0, the tokens
        sqrt(target_ratio * factors) (2.0 at target_ratio 4). arXiv 2507.07955; goombalab/hnet
        hnet/utils/train.py group_params."""
        if not self.has_dynamic_scale():
            return None
        c = self.compression()
        return [math.sqrt(c[-1] / f) for f in c]


@dataclass
class ParallelConfig:
    sp: int = doc(1, "Sequence-parallel degree: ranks that share one sample, each holding L/sp tokens.")
    zero_stage: Literal[0, 1, 2, 3] = doc(0, "DeepSpeed ZeRO stage.")
    offload_optimizer: bool = doc(False, "ZeRO: keep optimizer state in CPU memory.")
    activation_checkpointing: bool = doc(False, "Recompute each block's activations in backward.")
    offload_activations: bool = doc(False, "With activation checkpointing: keep the saved block inputs in CPU memory.")


@dataclass
class TrainConfig:
    max_steps: int = doc(1000, "Optimizer steps to train for.")
    micro_batch_size: int = doc(8, "Samples per rank per forward/backward.")
    grad_accum_steps: int = doc(1, "Micro-batches accumulated per optimizer step.")
    lr: float = doc(3e-4, "Peak learning rate.")
    min_lr: float = doc(3e-5, "Learning rate at the end of the decay.")
    warmup_steps: int = doc(100, "Linear warmup steps from 0 to `lr`.")
    schedule: Literal["cosine", "linear", "constant"] = doc("cosine", "Decay after warmup.")
    weight_decay: float = doc(0.1, "AdamW weight decay (never applied to norms and biases).")
    betas: list[float] = doc([0.9, 0.95], "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this (0 disables).")
    lr_multipliers: list[float] = doc(
        [],
        "Learning-rate multiplier per scale, tokens first (H-Net lists the outer stages first, e.g. "
        "[3.0, 1.7, 0.9]: goombalab/hnet hnet/utils/train.py group_params, hnet/models/mixer_seq.py "
        "apply_lr_multiplier): the parameters of scale s train at lr and min_lr times the s-th "
        "(AdamW groups per scale and weight decay, msllm.train.engine.param_groups). A router goes "
        "with the scale it reads (H-Net's outer stage), the embeddings, head, final layers and norm "
        "with scale 0. The logged lr is the first group's (scale 0's). []: H-Net's rule when a scale "
        "is dynamic (ModelConfig.default_lr_multipliers: sqrt of the compression to the coarsest "
        "scale over scale s's, [2.0, 1.0] at target_ratio 4), else one rate for all. All 1.0: one "
        "rate and the optimizer's two groups of before (a dynamic run started before issue 35 "
        "resumes with them, and with residual_proj and stage_norms false, embed_init_std 0.02).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = doc(
        "fp32", "Training precision. bf16 on GPUs; fp32 on CPUs (bf16 matmul is slow there)."
    )
    peak_flops: float = doc(
        0.0,
        "Peak FLOP/s per device for MFU. 0: on an accelerator, the dense bf16 peak of a known device "
        "(by name) or else a measured bf16 matmul; on a CPU, a measured dense fp32 matmul.",
    )
    loss_kernel: Literal["auto", "dense", "chunked", "liger", "cce"] = doc(
        "auto",
        "How the loss (head matmul, log-softmax, NLL) is computed, never holding all logits but for "
        "dense: auto picks liger on CUDA if installed, else cce if installed, else chunked; chunked is "
        "msllm's own (every device); liger and cce are fused CUDA kernels (pip install 'msllm[gpu]'); "
        "dense materialises every logit (the reference). The log says which ran.",
    )
    kernel_check: Literal["fallback", "strict", "off"] = doc(
        "fallback",
        "Before the first step, on the training device, run each non-reference kernel this run chose "
        "(FlexAttention for local and retina attention on CUDA; the liger or cce loss) forward and "
        "backward on a small input against its reference (blocked attention; the chunked loss). "
        "fallback: a kernel that raises or differs beyond its tolerance is replaced by its reference, "
        "said in one log line and recorded in run.json (key kernels); strict: stop with a one-line "
        "error instead; off: no check (the chosen kernels run unchecked).",
    )
    loss_chunk_size: int = doc(
        0,
        "Positions per chunk of the chunked loss; 0: as many as make one chunk's fp32 logits about "
        "32 MiB (262 positions at a 32k vocabulary).",
    )
    compile: bool = doc(
        False,
        "torch.compile each transformer block in place (parameter names unchanged, so checkpoints "
        "of compiled and uncompiled runs are interchangeable). Costs compile time at start-up.",
    )
    max_skipped_steps: int = doc(
        10,
        "Stop the run (exit 2, naming the last good checkpoint) after this many optimizer steps in a "
        "row were skipped because their gradients were NaN or inf. A skipped step changes nothing.",
    )
    stop_at_step: int = doc(
        0,
        "Stop after this step with a checkpoint, as on preemption, while the schedule still runs to "
        "max_steps (for jobs shorter than the run; rerun with 0 to finish). 0: train to max_steps.",
    )
    init_from: str = doc(
        "",
        "A local Hugging Face Llama folder (config.json, safetensors weights, a sentencepiece "
        "tokenizer.model) whose weights a new vanilla run starts from, instead of a random init. The "
        "recipe's model must be that Llama (`msllm import-hf` writes such a recipe) and its shards "
        "must use that tokenizer. A resumed run replaces these weights with its checkpoint's. Empty: "
        "random init.",
    )


@dataclass
class EvalConfig:
    every: int = doc(0, "Evaluate every this many steps (0: only at the end).")
    max_batches: int = doc(0, "Evaluate on at most this many batches (0: the whole split).")
    micro_batch_size: int = doc(0, "Eval batch size per rank (0: the train micro-batch size).")


@dataclass
class CheckpointConfig:
    every: int = doc(0, "Save every this many steps (0: only at the end).")
    keep_last: int = doc(2, "Keep this many most recent complete checkpoints.")
    resume: bool = doc(True, "Resume from the latest complete checkpoint in output_dir.")
    restart_if_all_corrupt: bool = doc(
        True,
        "When every checkpoint in output_dir fails its checks at resume (each is set aside, never "
        "deleted): start again from step 0 with a loud warning (true), or stop with an error (false).",
    )
    keep_global_batch: bool = doc(
        True,
        "A resume on another layout (ranks, dp x sp, ZeRO stage, micro-batch x accumulation) must keep "
        "the saved global batch (micro x accumulation x dp), else it stops and names the --set that "
        "keeps it; false lets the global batch change (the data still continue at the saved sample).",
    )


@dataclass
class LogConfig:
    every: int = doc(10, "Log a console line, a metrics.jsonl row and TensorBoard scalars every N steps.")
    tensorboard: bool = doc(True, "Write TensorBoard event files under output_dir/tensorboard.")
    sample_ids: bool = doc(
        False,
        "Add the global ids of the samples each step trained on (sorted) to its metrics.jsonl row: "
        "to check that a resumed run, on any number of ranks, reads what an uninterrupted one would.",
    )


@dataclass
class Recipe:
    run: RunConfig = doc(RunConfig(), "The run: name, output folder, seed.")
    data: DataConfig = doc(DataConfig(), "Corpus, tokenizer and shards.")
    model: ModelConfig = field(  # built when used: the architectures' configs register on import (registry)
        default_factory=ModelConfig, metadata={"help": "The architecture and its sizes.", "required": False}
    )
    parallel: ParallelConfig = doc(ParallelConfig(), "Sequence parallelism and DeepSpeed ZeRO.")
    train: TrainConfig = doc(TrainConfig(), "Optimizer and schedule.")
    eval: EvalConfig = doc(EvalConfig(), "Validation.")
    checkpoint: CheckpointConfig = doc(CheckpointConfig(), "Checkpoints and resume.")
    log: LogConfig = doc(LogConfig(), "Console, metrics.jsonl and TensorBoard.")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()  # the architecture's own fields flat beside the common ones
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_display_yaml(self) -> str:
        """The recipe as `msllm show-config` prints it: to_yaml() without the `window` of the
        scales that read none (ModelConfig.uses_window), without `pool`, `target_ratio`,
        `ratio_loss_weight` and `boundaries` on fixed scales (the default pooling; the others mean nothing there),
        without `mixer` on attention scales and `attention` on Mamba-2 ones, and without
        `model.mamba` when no scale is Mamba-2. to_yaml()
        stays what run folders, checkpoints and exports save; this form loads back into a recipe
        that builds the same model (an absent window takes its default, which nothing reads)."""
        shown = self.to_dict()
        for scale, raw in zip(self.model.scales, shown["model"]["scales"]):
            if not self.model.uses_window(scale):
                del raw["window"]
            if scale.pool == "fixed":
                del raw["pool"], raw["target_ratio"], raw["ratio_loss_weight"], raw["boundaries"]
            if scale.mixer == "attention":
                del raw["mixer"]
            else:
                del raw["attention"]
        if all(scale.mixer == "attention" for scale in self.model.scales):
            del shown["model"]["mamba"]
        return yaml.safe_dump(shown, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, follow its `base:` chain, apply overrides, type-check and validate it."""
    path = Path(path)
    raw = _read_with_bases(path, chain=())
    for item in overrides:
        _apply_override(raw, item, source=f"--set {item}")
    recipe = from_dict(raw, source=str(path))
    validate(recipe, source=str(path))
    return recipe


def from_dict(raw: dict, source: str = "<recipe>") -> Recipe:
    """Build a Recipe from plain data (a loaded YAML or a checkpoint's saved recipe)."""
    return _build(Recipe, raw, prefix="", source=source)


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"{chain[0]}: `base:` chain has a cycle: {cycle}")
    if not path.is_file():
        where = f"{chain[-1]}: base " if chain else ""
        raise RecipeError(f"{where}recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
            "save the recipe as UTF-8"
        ) from None
    try:
        data = load_yaml(text, source=str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{line} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise RecipeError(f"{path}: base: expected a path (or a list of paths), got {_describe(b)}")
        merged = _deep_merge(merged, _read_with_bases(path.parent / b, chain=(*chain, resolved)))
    return _deep_merge(merged, data)


# A recipe may hold at most this many values (every mapping, list and scalar, counted as often as
# aliases repeat them) nested at most this deep. Real recipes hold a few hundred values a few levels
# deep; an alias bomb (a few lines of anchors that expand to gigabytes) or a file nested thousands
# deep (which exhausts Python's recursion) is refused before anything is built from it.
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_DEPTH = 64


def load_yaml(text: str, source: str) -> Any:
    """The YAML document in `text` (safe tags only), or a RecipeError if it nests deeper than
    MAX_RECIPE_DEPTH or expands to more than MAX_RECIPE_VALUES values; yaml.YAMLError if invalid."""
    loader = _BoundedLoader(text, source)
    try:
        return loader.get_single_data()
    except ValueError as exc:  # a value the safe constructors cannot build: a 5000-digit integer, a 13th month
        raise RecipeError(f"{source}: a YAML value that cannot be read: {clip(str(exc))}") from None
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that bounds the document's depth while composing it (composing recurses) and
    its size with aliases expanded, once composed and before any Python object is built."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_RECIPE_DEPTH:
                raise RecipeError(f"{self.source}: YAML nested more than {MAX_RECIPE_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node):
        _check_expanded_size(node, self.source)
        return super().construct_document(node)


def _check_expanded_size(root: yaml.Node, source: str) -> None:
    """RecipeError if the node graph, aliases expanded, holds more than MAX_RECIPE_VALUES values,
    nests deeper than MAX_RECIPE_DEPTH, or contains itself. Iterative (a chain of aliases may be
    deeper than Python's recursion), each node visited once: the size of a node aliased many times
    is counted from its memo."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) with aliases expanded
    open_nodes: set[int] = set()  # nodes whose children are being counted: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _yaml_children(node)
        if children_done:
            open_nodes.discard(id(node))
            values = 1 + sum(done[id(c)][0] for c in children)
            depth = 1 + max((done[id(c)][1] for c in children), default=0)
            if values > MAX_RECIPE_VALUES:
                raise RecipeError(
                    f"{source}: the YAML expands to more than {MAX_RECIPE_VALUES:,} values (aliases "
                    "repeated): a recipe needs a few hundred; remove the repeated aliases"
                )
            if depth > MAX_RECIPE_DEPTH:
                raise RecipeError(f"{source}: YAML nested more than {MAX_RECIPE_DEPTH} levels deep (aliases expanded)")
            done[id(node)] = (values, depth)
        elif id(node) in open_nodes:
            raise RecipeError(f"{source}: a YAML anchor contains an alias of itself (an endless value)")
        elif id(node) not in done:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in done)


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(raw: dict, item: str, source: str) -> None:
    if "=" not in item:
        raise RecipeError(f"{source}: expected section.key=value")
    dotted, value_text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise RecipeError(f"{source}: expected section.key=value")
    try:
        value = load_yaml(value_text, source=source) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"{source}: {'.'.join(keys[:-1])} is not a section")
        if isinstance(child, list):
            raise RecipeError(f"{source}: {dotted} indexes into a list; set the whole list instead")
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {prefix or 'recipe'}: expected a mapping, got {_describe(raw)}")
    if cls is ModelConfig:
        return _build_model(raw, prefix, source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            name = clip(str(key))
            where = f"{prefix}.{name}" if prefix else name
            close = _suggest(name, list(fields))
            hint = (
                f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"
                if close
                else (f" (valid keys: {', '.join(fields)})")
            )
            raise RecipeError(f"{source}: unknown key {where}{hint}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            values[name] = _convert(hints[name], raw[name], key, source)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, key, source)  # so its required fields are checked
        elif f.metadata.get("required"):
            raise RecipeError(f"{source}: missing required value {key}")
    return cls(**values)


def _arch_configs() -> dict[str, type]:
    """{name: ArchConfig class} of every registered architecture (msllm.models.registry)."""
    from msllm.models.registry import ARCH_CONFIGS  # noqa: PLC0415 (cycle: msllm.models' architectures import msllm.config; start-up: msllm.config imports no torch)

    return ARCH_CONFIGS


def _archs_with(flag: str, value: Any = True) -> str:
    """The architectures whose ArchConfig has `flag` (or holds `value` in it), for messages."""
    names = [
        name
        for name, cls in _arch_configs().items()
        if (value in getattr(cls, flag) if not isinstance(value, bool) else getattr(cls, flag) == value)
    ]
    return " and ".join(names) or "none"


def _build_model(raw: dict, prefix: str, source: str) -> ModelConfig:
    """The model section: the common fields, and those of the architecture `arch` names (its
    ArchConfig), flat beside them. A field of another architecture is refused unless it holds that
    field's default (the form run folders saved before each architecture had its own fields: every
    architecture's fields, with their defaults); any other key is an unknown key, naming the
    architecture."""
    archs = _arch_configs()
    arch = raw.get("arch", ModelConfig.__dataclass_fields__["arch"].default)
    if arch not in archs:
        if "arch" not in raw:
            raise RecipeError(f"{source}: missing required value {prefix}.arch")
        choices = ", ".join(repr(a) for a in archs)
        raise RecipeError(f"{source}: {prefix}.arch: {short_repr(arch)} is not one of {choices}")
    own_cls = archs[arch]
    own_names = [f.name for f in dataclasses.fields(own_cls)]
    common_names = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "arch_config"]
    common, own = {}, {}
    if isinstance(raw.get("arch_config"), dict):  # dataclasses.asdict(ModelConfig): its own fields nested
        raw = {**{k: v for k, v in raw.items() if k != "arch_config"}, **raw["arch_config"]}
    for key, value in raw.items():
        if key in common_names:
            common[key] = value
        elif key in own_names:
            own[key] = value
        else:
            name = clip(str(key))
            others = [c for c in archs.values() if c is not own_cls and key in {f.name for f in dataclasses.fields(c)}]
            if others:
                default = _build(others[0], {}, prefix, source)
                if getattr(default, key) == value:
                    continue  # a saved recipe of before: every architecture's fields at their defaults
                raise RecipeError(
                    f"{source}: {prefix}.{name} is for {' and '.join(c.arch for c in others)} only, not "
                    f"{arch} ({arch}'s own fields: {', '.join(own_names) or 'none'})"
                )
            close = _suggest(name, common_names + own_names)
            hint = (
                f" (did you mean {prefix}.{close[0]}?)"
                if close
                else f" (valid keys: {', '.join(common_names + own_names)})"
            )
            raise RecipeError(f"{source}: unknown key {prefix}.{name} for arch {arch}{hint}")
    hints = typing.get_type_hints(ModelConfig)
    values = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name == "arch_config":
            continue
        key = f"{prefix}.{f.name}"
        if f.name in common:
            values[f.name] = _convert(hints[f.name], common[f.name], key, source)
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], {}, key, source)
        elif f.metadata.get("required"):
            raise RecipeError(f"{source}: missing required value {key}")
    return ModelConfig(arch_config=_build(own_cls, own, prefix, source), **values)


def _suggest(key: str, valid: list[str]) -> list[str]:
    """The valid key closest to a mistyped one: by spelling, else an abbreviation (learning_rate -> lr)."""
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return close

    def abbreviates(short: str) -> bool:
        letters = iter(key)
        return short[0] == key[0] and all(c in letters for c in short)

    return sorted((v for v in valid if abbreviates(v)), key=len, reverse=True)[:1]


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, source)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
            raise RecipeError(f"{source}: {key}: {short_repr(value)} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key}: expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: {key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{source}: {key}: expected an integer, got {_describe(value)}")
        if not -(1 << 63) <= value < 1 << 63:  # no count, size or seed needs more, and torch takes no more
            raise RecipeError(f"{source}: {key}: {_describe(value)} is out of range (at most 2**63-1 in size)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept it when it parses as a number.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise RecipeError(f"{source}: {key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{source}: {key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"config type {tp} of {key} is not supported")  # a bug in this file


def _describe(value: Any) -> str:
    """A bad value's type and its start, never more than a line."""
    if value is None:
        return "nothing (null)"
    return clip(f"{type(value).__name__} {short_repr(value)}")


def with_vocab_size(recipe: Recipe, vocab_size: int) -> Recipe:
    """The recipe with model.vocab_size taken from the tokenizer's `vocab_size` (when it is 0, the
    usual case), or checked against it: the one place where the model meets its tokenizer."""
    if recipe.model.vocab_size == 0:
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=vocab_size))
    if recipe.model.vocab_size < vocab_size:
        raise RecipeError(
            f"model.vocab_size {recipe.model.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} (set it to 0 to take the tokenizer's)"
        )
    return recipe


# ----------------------------------------------------------------------------------------------
# Validation: values that are each fine but do not fit together
# ----------------------------------------------------------------------------------------------


def validate(recipe: Recipe, source: str = "<recipe>") -> None:
    def fail(key: str, message: str) -> None:
        raise RecipeError(f"{source}: {key}: {message}")

    m = recipe.model
    positive = {
        "model.d_model": m.d_model,
        "model.n_heads": m.n_heads,
        "data.seq_len": recipe.data.seq_len,
        "data.tokenizer.vocab_size": recipe.data.tokenizer.vocab_size,
        "data.workers": recipe.data.workers,
        "data.prep_checkpoint_bytes": recipe.data.prep_checkpoint_bytes,
        "train.max_steps": recipe.train.max_steps,
        "train.micro_batch_size": recipe.train.micro_batch_size,
        "train.grad_accum_steps": recipe.train.grad_accum_steps,
        "train.max_skipped_steps": recipe.train.max_skipped_steps,
        "parallel.sp": recipe.parallel.sp,
        "log.every": recipe.log.every,
    }
    for key, value in positive.items():
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    if not 0 <= recipe.run.seed < SEED_LIMIT:
        fail("run.seed", f"must be in [0, 2**63), got {recipe.run.seed}")
    d = recipe.data
    if d.seq_len > MAX_SEQ_LEN:
        fail("data.seq_len", f"at most {MAX_SEQ_LEN:,} (2**24) tokens, got {d.seq_len:,}")
    tok = d.tokenizer
    smallest_vocab = SPECIAL_PIECES + (BYTE_PIECES if tok.byte_fallback else 0)
    if tok.type == "bytes" and tok.model:
        fail("data.tokenizer.model", "type bytes has no tokenizer model to reuse; unset data.tokenizer.model")
    if tok.type != "bytes" and not tok.model and tok.vocab_size < smallest_vocab:
        pieces = f"{SPECIAL_PIECES} special pieces" + (
            f" and {BYTE_PIECES} byte pieces (byte_fallback)" if tok.byte_fallback else ""
        )
        fail(
            "data.tokenizer.vocab_size",
            f"{tok.vocab_size} is too small: a tokenizer needs its {pieces} plus one piece per character "
            f"of the corpus; set data.tokenizer.vocab_size to {smallest_vocab} or more (msllm prep names "
            "the corpus's exact minimum)",
        )
    if not 0.98 <= tok.character_coverage <= 1.0:  # what sentencepiece accepts
        fail("data.tokenizer.character_coverage", f"must be between 0.98 and 1, got {tok.character_coverage}")
    sample_bytes = 4 * (d.seq_len + 1)  # int32 tokens
    if not sample_bytes <= d.shard_size_limit < 1 << 32:
        fail(
            "data.shard_size_limit",
            f"must hold one sample of seq_len+1 int32 tokens ({sample_bytes:,} bytes) and stay below 2**32 "
            f"(mosaicml-streaming's limit), got {d.shard_size_limit:,}",
        )
    for key, value in {
        "model.vocab_size": m.vocab_size,
        "model.mlp_hidden": m.mlp_hidden,
        "train.warmup_steps": recipe.train.warmup_steps,
        "train.stop_at_step": recipe.train.stop_at_step,
        "train.grad_clip": recipe.train.grad_clip,
        "train.peak_flops": recipe.train.peak_flops,
        "train.loss_chunk_size": recipe.train.loss_chunk_size,
        "eval.every": recipe.eval.every,
        "eval.max_batches": recipe.eval.max_batches,
        "checkpoint.every": recipe.checkpoint.every,
        "checkpoint.keep_last": recipe.checkpoint.keep_last,
        "data.num_workers": recipe.data.num_workers,
        "data.num_canonical_nodes": recipe.data.num_canonical_nodes,
        "data.tokenizer.input_sentence_size": recipe.data.tokenizer.input_sentence_size,
    }.items():
        if value < 0:
            fail(key, f"must not be negative, got {value}")
    for key, value in _float_fields(recipe):
        if not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")
    t = recipe.train
    for key, value in {
        "train.lr": t.lr,
        "train.eps": t.eps,
        "model.init_std": m.init_std,
        "model.norm_eps": m.norm_eps,
        "model.rope_theta": m.rope_theta,
    }.items():
        if value <= 0:
            fail(key, f"must be positive, got {value}")
    for key, value in {"train.min_lr": t.min_lr, "train.weight_decay": t.weight_decay}.items():
        if value < 0:
            fail(key, f"must not be negative, got {value}")
    for i, beta in enumerate(t.betas):
        if not 0.0 <= beta < 1.0:
            fail(f"train.betas[{i}]", f"must be in [0, 1), got {beta}")
    if not 0.0 < recipe.data.validation_fraction < 1.0:
        fail("data.validation_fraction", f"must be between 0 and 1, got {recipe.data.validation_fraction}")
    if recipe.data.source in ("text", "jsonl") and not recipe.data.paths:
        fail("data.paths", f"source {recipe.data.source!r} needs at least one file or glob in data.paths")
    if m.d_model % m.n_heads:
        fail("model.n_heads", f"d_model {m.d_model} is not divisible by n_heads {m.n_heads}")
    if m.head_dim % 2:
        fail("model.n_heads", f"head dim d_model/n_heads = {m.head_dim} must be even for RoPE")
    if len(recipe.train.betas) != 2:
        fail("train.betas", f"expected two numbers [beta1, beta2], got {_describe(recipe.train.betas)}")
    if recipe.train.lr < recipe.train.min_lr:
        fail("train.min_lr", f"{recipe.train.min_lr} is above train.lr {recipe.train.lr}")
    if not m.scales:
        fail("model.scales", "needs at least one scale")
    for s, scale in enumerate(m.scales):
        key = f"model.scales[{s}]"
        if s == 0 and scale.factor != 1:
            fail(f"{key}.factor", f"the token scale has factor 1, got {scale.factor}")
        if scale.pool == "dynamic":
            if not m.arch_config.dynamic_pool:
                fail(f"{key}.pool", f"dynamic chunking is for {_archs_with('dynamic_pool')} only, not {m.arch}")
            if s == 0 or s != len(m.scales) - 1:
                fail(f"{key}.pool", "dynamic: only the coarsest scale (the last, not the token scale) can be dynamic")
            if scale.factor != 1:
                fail(
                    f"{key}.factor",
                    f"a dynamic scale has no pooling factor (leave it at 1; set target_ratio), got {scale.factor}",
                )
            if not scale.target_ratio > 1.0:
                fail(f"{key}.target_ratio", f"must be above 1, got {scale.target_ratio}")
            if scale.boundaries == "fixed" and scale.target_ratio != int(scale.target_ratio):
                fail(
                    f"{key}.target_ratio",
                    "boundaries: fixed cuts every target_ratio positions: give a whole number, "
                    f"not {scale.target_ratio}",
                )
            if scale.ratio_loss_weight < 0:
                fail(f"{key}.ratio_loss_weight", f"must not be negative, got {scale.ratio_loss_weight}")
            if recipe.parallel.sp > 1:
                fail("parallel.sp", "a dynamic-chunking scale does not run under sequence parallelism yet; use sp 1")
        elif s > 0 and scale.factor < 2:
            fail(f"{key}.factor", f"a coarser scale needs a pooling factor >= 2, got {scale.factor}")
        if scale.pool == "fixed" and scale.boundaries != "learned":
            fail(
                f"{key}.boundaries", "is read by dynamic scales only (pool: dynamic); a fixed scale cuts every `factor`"
            )
        if scale.layers < 0 or (scale.layers == 0 and not m.arch_config.multi_scale):
            fail(f"{key}.layers", f"must be at least 1, got {scale.layers}")
        if scale.window < 1:
            fail(f"{key}.window", f"must be at least 1, got {scale.window}")
        if scale.mixer == "mamba2":
            if "mamba2" not in m.arch_config.mixers:
                # e.g. vanilla exports as a Llama checkpoint (msllm.checkpoint.llama.can_be_llama reads attention only)
                fail(f"{key}.mixer", f"mamba2 is for {_archs_with('mixers', 'mamba2')}, not {m.arch}")
            if recipe.parallel.sp > 1:
                fail(
                    "parallel.sp", "Mamba-2 layers (mixer: mamba2) do not run under sequence parallelism yet; use sp 1"
                )
    if any(scale.mixer == "mamba2" for scale in m.scales):
        mb = m.mamba
        for name in ("d_state", "d_conv", "expand", "head_dim", "chunk_size"):
            if getattr(mb, name) < 1:
                fail(f"model.mamba.{name}", f"must be at least 1, got {getattr(mb, name)}")
        if (mb.expand * m.d_model) % mb.head_dim:
            fail(
                "model.mamba.head_dim",
                f"{mb.head_dim} does not divide the inner width expand * d_model = {mb.expand * m.d_model}",
            )
    if m.embed_init_std is not None and not m.embed_init_std > 0:
        fail("model.embed_init_std", f"must be positive, got {m.embed_init_std}")
    if t.lr_multipliers:
        if len(t.lr_multipliers) != len(m.scales):
            fail(
                "train.lr_multipliers",
                f"needs one multiplier per scale ({len(m.scales)}, tokens first), got {len(t.lr_multipliers)}",
            )
        for i, value in enumerate(t.lr_multipliers):
            if not value > 0:
                fail(f"train.lr_multipliers[{i}]", f"must be positive, got {value}")
    multi = m.arch_config.multi_scale
    if multi and len(m.scales) < 2:
        fail("model.scales", f"{m.arch} needs at least two scales (tokens and one coarser), got {len(m.scales)}")
    if not multi and len(m.scales) != 1:
        fail("model.scales", f"{m.arch} has a single stack: give exactly one scale, got {len(m.scales)}")
    m.arch_config.validate(m, recipe, fail)
    if recipe.train.init_from and (not m.arch_config.llama or m.scales[0].attention != "full"):
        fail(
            "train.init_from",
            f"a Hugging Face Llama folder starts a {_archs_with('llama')} model with full "
            f"attention only, got {m.arch} with {m.scales[0].attention} attention",
        )
    multiple = m.length_multiple()
    if recipe.data.seq_len % multiple:
        fail(
            "data.seq_len",
            f"{recipe.data.seq_len} is not a multiple of the cumulative pooling factor {multiple} "
            f"(model.scales factors {clip(str([s.factor for s in m.scales[1:]]))}); use e.g. "
            f"{max(multiple, recipe.data.seq_len // multiple * multiple)}",
        )
    sp = recipe.parallel.sp
    if sp > 1:
        if m.n_heads % sp:
            fail("parallel.sp", f"n_heads {m.n_heads} is not divisible by sp {sp}")
        for s, f_s in enumerate(m.cumulative_factors() if multi else [1]):
            if recipe.data.seq_len % (f_s * sp):
                fail(
                    "parallel.sp",
                    f"scale {s} has L/f_s = {recipe.data.seq_len}/{f_s} positions, which do not split "
                    f"evenly over sp={sp} ranks",
                )
        # Halos come from the previous rank only: a window must fit in one rank's slice.
        for s, (scale, f_s) in enumerate(zip(m.scales, m.cumulative_factors())):
            per_rank = recipe.data.seq_len // (f_s * sp)
            if m.uses_window(scale) and scale.window > per_rank:
                fail(
                    f"model.scales[{s}].window",
                    f"window {scale.window} is longer than the {per_rank} positions each of the sp={sp} "
                    f"ranks holds at scale {s}; lower the window or sp, or raise data.seq_len",
                )
    if recipe.parallel.offload_activations and not recipe.parallel.activation_checkpointing:
        fail("parallel.offload_activations", "needs parallel.activation_checkpointing: true")


def _float_fields(node: Any, prefix: str = "") -> typing.Iterator[tuple[str, float]]:
    """(dotted key, value) of every float in a recipe, lists of floats included."""
    for f in dataclasses.fields(node):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(node, f.name)
        if f.metadata.get("arch_config"):  # the architecture's own fields, keyed flat in the model section
            yield from _float_fields(value, prefix)
        elif dataclasses.is_dataclass(value):
            yield from _float_fields(value, key)
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _float_fields(item, f"{key}[{i}]")
                elif isinstance(item, float):
                    yield f"{key}[{i}]", item


def field_docs(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, for documentation."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if f.metadata.get("arch_config"):  # each architecture's own fields, flat in the model section
            for arch_cls in _arch_configs().values():
                for row in field_docs(arch_cls, prefix):
                    rows.append((row[0], row[1], row[2], f"({arch_cls.arch} only) {row[3]}"))
            continue
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
            if isinstance(default, list):
                default = [dataclasses.asdict(d) if dataclasses.is_dataclass(d) else d for d in default]
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))
