"""`msllm generate (CHECKPOINT | EXPORT) --prompt TEXT [--prompt TEXT ...]`: sampling for every
architecture, with cached decoding (msllm.models.decoding): the prompt is read in one pass, then
each new token costs one pass over that token.

Each prompt is preceded by the EOS token, as every training document follows one. Several prompts
are decoded as one batch: the shortest length is prefilled, then every row advances one token per
step, a row whose prompt is longer taking its next prompt token instead of a sampled one, so no row
is padded and rows cannot affect each other. Each row stops at its own EOS or after
max_new_tokens; the batch stops when every row has.

Past the trained context (data.seq_len) positions keep counting: every architecture accepts any
length and RoPE extrapolates (how well is not measured here); local and retina attention see no
farther back than in training, full attention sees everything. The CLI notes it on stderr.
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


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row [B] from the last position's logits [B, vocab]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_id: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (a list of token ids, at least one), at most max_new_tokens,
    ending before `stop_id` (not included) if the row samples it."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("generate: every prompt needs at least one token")
    new: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens < 1:
        return new
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    position = min(len(p) for p in prompts)  # of the tokens chosen next
    running = [True] * len(prompts)
    cache = model.new_cache()
    logits = model.decode(torch.tensor([p[:position] for p in prompts], device=device), cache, last_only=True)
    while True:
        sampled = sample_next(logits[:, -1], temperature, top_k, top_p, gen).tolist()
        step = []
        for row, prompt in enumerate(prompts):
            if position < len(prompt):  # still reading its prompt
                step.append(prompt[position])
                continue
            step.append(sampled[row])
            if running[row]:
                if sampled[row] == stop_id:
                    running[row] = False
                else:
                    new[row].append(sampled[row])
                    running[row] = len(new[row]) < max_new_tokens
        if not any(running):
            return new
        logits = model.decode(torch.tensor(step, device=device).view(-1, 1), cache, last_only=True)
        position += 1


def generate_cli(args) -> list[str]:
    """Sample from `args.source` for each of `args.prompt` (one text or a list); print and return
    the texts (prompt and continuation), one per prompt, separated by blank lines when several."""
    import sys

    for name, ok in (
        ("--max-new-tokens", args.max_new_tokens >= 0),
        ("--temperature", args.temperature >= 0),
        ("--top-k", args.top_k >= 0),
        ("--top-p", 0.0 < args.top_p <= 1.0),
    ):
        if not ok:
            raise MsllmError(f"{name}: out of range ({getattr(args, name[2:].replace('-', '_'))})")
    texts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
    torch.manual_seed(args.seed)
    model, model_cfg, sp, seq_len = load_for_inference(args.source)
    start = [sp.eos_id()] if sp.eos_id() >= 0 else []
    prompts = [start + sp.encode(text) for text in texts]
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    if seq_len and longest > seq_len:
        print(f"note: up to {longest} positions, beyond the {seq_len} the model was trained on; positions keep "
              "counting (RoPE extrapolates)", file=sys.stderr)
    new = generate(
        model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
        stop_id=sp.eos_id() if sp.eos_id() >= 0 else None,
    )
    out = [sp.decode(sp.encode(text) + tokens) for text, tokens in zip(texts, new)]
    print("\n\n".join(out))
    return out
