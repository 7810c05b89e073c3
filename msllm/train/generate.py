"""`msllm generate (CHECKPOINT | EXPORT) --prompt TEXT`: sampling for every architecture.

No KV cache: the model is run on the whole (growing) sequence at every new token, cropped to the
last data.seq_len tokens, which every architecture accepts. The prompt is preceded by the EOS token,
as every training document follows one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from msllm.errors import CheckpointError, MsllmError


def load_for_inference(source: str | Path):
    """(model in eval mode, ModelConfig, sentencepiece processor, seq_len) from an export folder,
    a checkpoint folder or a run's output_dir."""
    import sentencepiece as spm

    from msllm.config import ModelConfig, from_dict
    from msllm.models import build_model
    from msllm.train.checkpoint import consolidated_state_dict, read_recipe, resolve_checkpoint

    src = Path(source)
    if (src / "model.safetensors").is_file() and (src / "config.json").is_file():
        from safetensors.torch import load_file

        try:
            raw = json.loads((src / "config.json").read_text())
            model_cfg = from_dict({"model": raw}, source=str(src / "config.json")).model
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{src}/config.json cannot be read: {exc}") from None
        state = load_file(str(src / "model.safetensors"))
        seq_len = 0
        if (src / "export.json").is_file():
            seq_len = int(json.loads((src / "export.json").read_text()).get("seq_len") or 0)
        tokenizer = src / "tokenizer.model"
    else:
        ckpt = resolve_checkpoint(src)
        recipe = read_recipe(ckpt)
        model_cfg, seq_len = recipe.model, recipe.data.seq_len
        state = consolidated_state_dict(ckpt)
        tokenizer = ckpt / "tokenizer.model"
    assert isinstance(model_cfg, ModelConfig)
    if not tokenizer.is_file():
        raise CheckpointError(f"{src}: no tokenizer.model")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{src}: weights do not fit {model_cfg.arch}: {str(exc).splitlines()[0]}") from None
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return model.eval(), model_cfg, sp, seq_len


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """One token from the last position's logits [vocab]; temperature 0 is greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, context: int = 0, stop_id: int | None = None) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = ids[-context:] if context else ids
        logits = model(torch.tensor([window], dtype=torch.long))[0, -1]
        token = sample_next(logits, temperature, top_k, top_p, gen)
        if stop_id is not None and token == stop_id:
            break
        ids.append(token)
        new.append(token)
    return new


def generate_cli(args) -> str:
    for name, ok in (
        ("--max-new-tokens", args.max_new_tokens >= 0),
        ("--temperature", args.temperature >= 0),
        ("--top-k", args.top_k >= 0),
        ("--top-p", 0.0 < args.top_p <= 1.0),
    ):
        if not ok:
            raise MsllmError(f"{name}: out of range ({getattr(args, name[2:].replace('-', '_'))})")
    torch.manual_seed(args.seed)
    model, model_cfg, sp, seq_len = load_for_inference(args.source)
    start = [sp.eos_id()] if sp.eos_id() >= 0 else []
    prompt_ids = start + sp.encode(args.prompt)
    new = generate(
        model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
        context=seq_len, stop_id=sp.eos_id() if sp.eos_id() >= 0 else None,
    )
    text = sp.decode(sp.encode(args.prompt) + new)
    print(text)
    return text
