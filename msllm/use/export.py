"""`msllm export SOURCE --out DIR`: consolidated weights anyone can load without DeepSpeed (SOURCE:
a checkpoint or a run's output_dir, loaded and checked by msllm.use.load).

    DIR/model.safetensors   fp32 weights under msllm's parameter names (any ZeRO stage)
    DIR/config.json         the model section of the recipe (vocab_size filled in)
    DIR/recipe.yaml         the resolved recipe of the run
    DIR/tokenizer.model     the sentencepiece tokenizer
    DIR/export.json         step, tokens seen, tokenizer sha256, source checkpoint, run record
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


def export_checkpoint(source: str, out: str, force: bool = False) -> Path:
    """Export the model in `source` (a checkpoint, a run's output_dir: msllm.use.load) to `out`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from msllm.checkpoint.files import describe_write_error
    from msllm.use.load import load_model

    out_dir = Path(out)
    origin, target = Path(source).resolve(), out_dir.resolve()
    if target == origin or origin in target.parents or target in origin.parents:
        raise CheckpointError(
            f"--out {out_dir} is, contains or lies inside the checkpoint source {source}: export to another folder"
        )
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists: pass --force to replace it")
    loaded = load_model(source)
    recipe, meta = loaded.recipe, loaded.meta
    # Shared tensors (tied embeddings) are stored once per name: safetensors refuses aliases.
    state = {k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()}
    tokenizer = loaded.path / "tokenizer.model"

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
            "checkpoint": str(loaded.path.resolve()),
            "step": meta.get("step"),
            "tokens": meta.get("tokens"),
            "seq_len": recipe.data.seq_len,
            "tokenizer_sha256": meta.get("tokenizer_sha256"),
            "run_record": meta.get("run_record"),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        note = ""
        if recipe.model.arch == "vanilla" and recipe.model.scales[0].attention == "full":
            _write_hf(tmp / "hf", recipe, state, tokenizer)
            note = " and hf/ (LlamaForCausalLM)"
        elif recipe.model.arch == "vanilla":
            note = " (no hf/: Llama has no local attention; train vanilla with attention: full to get one)"
        _match_modes(tmp)
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
    except BaseException as exc:  # a full disk, an interrupt, a library's own error: no half export stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # safetensors reports a failed write as its own error
            raise CheckpointError(f"could not write the export {out_dir}: {describe_write_error(exc, out_dir.parent)}") from None
        raise
    print(f"exported {loaded.path} (step {meta.get('step')}) to {out_dir}: model.safetensors, config.json, recipe.yaml, tokenizer.model{note}")
    return out_dir


def _match_modes(folder: Path) -> None:
    """Every file the mode a plain file gets here (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


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
