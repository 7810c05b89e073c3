"""`msllm generate (CHECKPOINT | EXPORT) --prompt TEXT [--prompt TEXT ...]`: sampling for every
architecture, with cached decoding (msllm.models.decoding): the prompt is read in one pass, then
each new token costs one pass over that token. A model with a dynamic-chunking scale has no cached
decoding yet: it runs over the whole sequence for each new token.

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

import sys

import torch

from msllm.errors import MsllmError
from msllm.use.load import load_model


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator
) -> torch.Tensor:
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
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
    vocab_limit: int = 0,
) -> list[list[int]]:
    """The new tokens of each prompt (a list of token ids, at least one), at most max_new_tokens,
    ending before `stop_id` (not included) if the row samples it. `vocab_limit` (0: none): only ids
    below it are sampled (a model whose vocabulary is padded beyond its tokenizer's)."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("generate: every prompt needs at least one token")
    new: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens < 1:
        return new
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    position = min(len(p) for p in prompts)  # of the tokens chosen next
    running = [True] * len(prompts)
    decode = _decoder(model)
    logits = decode(torch.tensor([p[:position] for p in prompts], device=device))
    while True:
        last = logits[:, -1] if not vocab_limit else logits[:, -1, :vocab_limit]
        sampled = sample_next(last, temperature, top_k, top_p, gen).tolist()
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
        logits = decode(torch.tensor(step, device=device).view(-1, 1))
        position += 1


def _decoder(model):
    """new_ids [B, n] -> the last position's logits [B, 1, vocab] of the sequence so far: cached
    decoding, or, for a model without it (a dynamic-chunking scale), a forward over every token
    so far at each step (the same logits, at the cost of the whole sequence per token)."""
    try:
        cache = model.new_cache()
    except MsllmError:
        seen: list[torch.Tensor] = []

        def recompute(new_ids: torch.Tensor) -> torch.Tensor:
            seen.append(new_ids)
            return model(torch.cat(seen, dim=1))[:, -1:]

        return recompute
    return lambda new_ids: model.decode(new_ids, cache, last_only=True)


MIN_TEMPERATURE = 1e-3  # below it (but for 0, greedy), logits / temperature overflows fp32


def generate_cli(
    source: str,
    prompts: list[str] | str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """`msllm generate`: sample from the model in `source` (msllm.use.load) for each prompt; print
    and return the texts (prompt and continuation), one per prompt, blank-line separated."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    for name, value, ok, why in (
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 0, "at least 0"),
        (
            "--temperature",
            temperature,
            temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf"),
            f"0 (greedy) or at least {MIN_TEMPERATURE:g}",
        ),
        ("--top-k", top_k, top_k >= 0, "at least 0"),
        ("--top-p", top_p, 0.0 < top_p <= 1.0, "in (0, 1]"),
        ("--seed", seed, 0 <= seed < 2**63, "in [0, 2^63)"),
    ):
        if not ok:
            raise MsllmError(f"{name}: {value!r:.40} is out of range: it must be {why}")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise MsllmError(
                "--prompt: not valid UTF-8 text (pass the prompt in your terminal's UTF-8 encoding)"
            ) from None
    torch.manual_seed(seed)
    loaded = load_model(source)
    tokenizer, seq_len = loaded.tokenizer, loaded.recipe.data.seq_len
    eos = tokenizer.special_ids()["eos_id"]
    start = [eos] if eos >= 0 else []
    encoded = [start + ids for ids in tokenizer.encode(texts)]
    longest = max(len(p) for p in encoded) + max_new_tokens
    if seq_len and longest > seq_len:
        print(
            f"note: up to {longest} positions, beyond the {seq_len} the model was trained on; positions keep "
            "counting (RoPE extrapolates)",
            file=sys.stderr,
        )
    new = generate(
        loaded.model,
        encoded,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop_id=eos if eos >= 0 else None,
        vocab_limit=tokenizer.vocab_size,
    )
    out = [tokenizer.decode(ids + tokens) for ids, tokens in zip(tokenizer.encode(texts), new)]
    print("\n\n".join(out))
    return out
