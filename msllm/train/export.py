"""`msllm export CHECKPOINT --out DIR`: consolidated weights anyone can load without DeepSpeed.

    DIR/model.safetensors   fp32 weights under msllm's parameter names (any ZeRO stage)
    DIR/config.json         the model section of the recipe (vocab_size filled in)
    DIR/recipe.yaml         the resolved recipe of the run
    DIR/tokenizer.model     the sentencepiece tokenizer
    DIR/export.json         step, tokens seen, tokenizer sha256, source checkpoint
    DIR/hf/                 vanilla with full attention only: a Hugging Face LlamaForCausalLM folder

The folder is written under a temporary name next to DIR and renamed into place at the end; an
existing DIR is replaced only with --force.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from msllm.errors import CheckpointError


def hf_llama_config(model_cfg, seq_len: int, special: dict) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.hidden_dim,
        "num_hidden_layers": model_cfg.scales[0].layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "initializer_range": model_cfg.init_std,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = special.get(key.replace("_token", ""))
        if value is not None and value >= 0:
            cfg[key] = int(value)
    return cfg


_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}


def to_hf_names(state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    """msllm vanilla names -> Hugging Face Llama names (q/k need no permutation: both use rotate_half)."""
    out = {}
    for name, t in state.items():
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "lm_head.weight":
            if not tie:
                out["lm_head.weight"] = t
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest not in _LAYER:
                raise CheckpointError(f"export: no Hugging Face Llama name for parameter {name}")
            out[f"model.layers.{i}.{_LAYER[rest]}"] = t
        else:
            raise CheckpointError(f"export: no Hugging Face Llama name for parameter {name}")
    return {k: v.contiguous() for k, v in out.items()}


def export_checkpoint(checkpoint: str, out: str, force: bool = False) -> Path:
    from safetensors.torch import save_file

    from msllm.models import build_model
    from msllm.data.tokenizer import file_sha256
    from msllm.train.checkpoint import consolidated_state_dict, read_meta, read_recipe, resolve_checkpoint

    out_dir = Path(out)
    source = Path(checkpoint).resolve()
    target = out_dir.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise CheckpointError(
            f"--out {out_dir} is, contains or lies inside the checkpoint source {checkpoint}: export to another folder"
        )
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists: pass --force to replace it")
    ckpt = resolve_checkpoint(checkpoint)
    recipe = read_recipe(ckpt)
    meta = read_meta(ckpt)
    state = consolidated_state_dict(ckpt)
    model = build_model(recipe.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt}: weights do not fit its own recipe's model: {str(exc).splitlines()[0]}") from None
    # Shared tensors (tied embeddings) are stored once per name: safetensors refuses aliases.
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}

    tokenizer = ckpt / "tokenizer.model"
    if not tokenizer.is_file() and meta.get("tokenizer_path"):
        tokenizer = Path(meta["tokenizer_path"])
    if not tokenizer.is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.model in the checkpoint nor at {meta.get('tokenizer_path')}")
    if meta.get("tokenizer_sha256") and file_sha256(tokenizer) != meta["tokenizer_sha256"]:
        raise CheckpointError(f"{tokenizer} is not the tokenizer {ckpt} was trained with (sha256 differs)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "arch": recipe.model.arch})
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(recipe.model), indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        info = {
            "checkpoint": str(ckpt.resolve()),
            "step": meta.get("step"),
            "tokens": meta.get("tokens"),
            "seq_len": recipe.data.seq_len,
            "tokenizer_sha256": meta.get("tokenizer_sha256"),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        note = ""
        if recipe.model.arch == "vanilla" and recipe.model.scales[0].attention == "full":
            _write_hf(tmp / "hf", recipe, state, tokenizer)
            note = " and hf/ (LlamaForCausalLM)"
        elif recipe.model.arch == "vanilla":
            note = " (no hf/: Llama has no local attention; train vanilla with attention: full to get one)"
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the export {out_dir}: {exc.strerror or exc}") from None
    print(f"exported {ckpt} (step {meta.get('step')}) to {out_dir}: model.safetensors, config.json, recipe.yaml, tokenizer.model{note}")
    return out_dir


def _special_ids(tokenizer: Path) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}


def _write_hf(hf: Path, recipe, state: dict, tokenizer: Path) -> None:
    from safetensors.torch import save_file

    hf.mkdir()
    special = _special_ids(tokenizer)
    cfg = hf_llama_config(recipe.model, recipe.data.seq_len, special)
    (hf / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(to_hf_names(state, recipe.model.tie_embeddings), str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "generation_config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=2) + "\n"
    )
    shutil.copyfile(tokenizer, hf / "tokenizer.model")
