"""msllm's vanilla model <-> Hugging Face LlamaForCausalLM, both ways: the config and the parameter
names. The two are the same network (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, no biases), so
the weights are the same tensors under other names; q and k need no permutation, as both sides
rotate halves.

    llama_config(model_cfg, seq_len, special)   msllm's model section -> LlamaConfig's config.json
    to_llama_names(state, tie)                  msllm's parameter names -> Llama's
    model_section_from_llama(config, where)     a Llama config.json -> msllm's model section (checked)
    from_llama_names(state, tie, where)         Llama's parameter names -> msllm's
"""

from __future__ import annotations

import torch

from msllm.errors import CheckpointError


def can_be_llama(model_cfg) -> bool:
    """Llama has full attention only: vanilla with local attention exports as an msllm model."""
    return model_cfg.arch == "vanilla" and model_cfg.scales[0].attention == "full"


def llama_config(model_cfg, seq_len: int, special: dict) -> dict:
    """config.json of LlamaForCausalLM for msllm's vanilla `model_cfg` (full attention), with the
    tokenizer's special ids `special` (special_token_ids)."""
    return {
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
        **special,
    }


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
_ENDS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def _llama_name(name: str) -> str | None:
    if name in _ENDS:
        return _ENDS[name]
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        if rest in _LAYER:
            return f"model.layers.{i}.{_LAYER[rest]}"
    return None


def to_llama_names(state: dict[str, torch.Tensor], tie: bool) -> dict[str, torch.Tensor]:
    """msllm vanilla names -> Hugging Face Llama names (a tied head is stored once, as Llama does)."""
    out = {}
    for name, t in state.items():
        target = _llama_name(name)
        if target is None:
            raise CheckpointError(f"export: no Hugging Face Llama name for parameter {name}")
        if not (tie and name == "lm_head.weight"):
            out[target] = t.contiguous()
    return out


def from_llama_names(state: dict[str, torch.Tensor], n_layers: int, tie: bool, where: str) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names -> msllm vanilla names; every parameter of an n_layers model, no other."""
    names = ["embed.weight", "norm.weight"] + [f"layers.{i}.{rest}" for i in range(n_layers) for rest in _LAYER]
    names += [] if tie else ["lm_head.weight"]
    out, used = {}, set()
    for name in names:
        source = _llama_name(name)
        if source not in state:
            raise CheckpointError(f"{where}: no {source} among the weights: not a LlamaForCausalLM of this config")
        out[name] = state[source]
        used.add(source)
    if tie:
        out["lm_head.weight"] = out["embed.weight"]
        used.add("lm_head.weight")
    extra = sorted(k for k in set(state) - used if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"{where}: weights msllm's vanilla model has no place for: {', '.join(extra[:5])}")
    return out


def model_section_from_llama(config: dict, where: str) -> dict:
    """msllm's model section (vanilla) for a Hugging Face Llama config.json, or a CheckpointError
    naming the first thing msllm's vanilla model cannot represent."""

    def need(condition: bool, what: str) -> None:
        if not condition:
            raise CheckpointError(f"{where}: {what}: msllm's vanilla model cannot represent it")

    def get(key: str):
        if key not in config:
            raise CheckpointError(f"{where}: no {key}: not a Llama config.json")
        return config[key]

    need(config.get("model_type") == "llama", f"model_type {config.get('model_type')!r} is not 'llama'")
    d, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    need(d % heads == 0, f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
    need(int(config.get("num_key_value_heads") or heads) == heads, "grouped-query attention (num_key_value_heads "
         f"{config.get('num_key_value_heads')} != num_attention_heads {heads})")
    need(int(config.get("head_dim") or d // heads) == d // heads, f"head_dim {config.get('head_dim')} != hidden_size / heads")
    need(config.get("hidden_act", "silu") == "silu", f"hidden_act {config.get('hidden_act')!r}")
    need(not config.get("attention_bias") and not config.get("mlp_bias"), "biases in attention or MLP")
    rope = config.get("rope_parameters") or {}  # newer transformers keep rope_theta there
    need(not config.get("rope_scaling") and rope.get("rope_type", "default") == "default",
         f"RoPE scaling {config.get('rope_scaling') or rope}")
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    return {
        "arch": "vanilla",
        "vocab_size": int(get("vocab_size")),
        "d_model": d,
        "n_heads": heads,
        "mlp_hidden": int(get("intermediate_size")),
        "scales": [{"factor": 1, "layers": int(get("num_hidden_layers")), "attention": "full"}],
        "rope_theta": float(theta),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "init_std": float(config.get("initializer_range", 0.02)),
    }
