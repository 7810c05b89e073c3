"""`msllm generate (CHECKPOINT | EXPORT) --prompt TEXT`: sampling for every architecture.

No KV cache: the model is run on the whole (growing) sequence at every new token, cropped to the
last data.seq_len tokens, which every architecture accepts. The prompt is preceded by the EOS token,
as every training document follows one.
"""

from __future__ import annotations

import torch

from msllm.errors import MsllmError


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


def generate_cli(source: str, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0) -> str:
    """`msllm generate`: load the model in `source` (msllm.use.load), sample, print the text."""
    from msllm.use.load import load_model

    for name, value, ok in (
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 0),
        ("--temperature", temperature, temperature >= 0),
        ("--top-k", top_k, top_k >= 0),
        ("--top-p", top_p, 0.0 < top_p <= 1.0),
    ):
        if not ok:
            raise MsllmError(f"{name}: out of range ({value})")
    torch.manual_seed(seed)
    loaded = load_model(source)
    sp = loaded.tokenizer
    start = [sp.eos_id()] if sp.eos_id() >= 0 else []
    prompt_ids = start + sp.encode(prompt)
    new = generate(
        loaded.model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
        context=loaded.recipe.data.seq_len, stop_id=sp.eos_id() if sp.eos_id() >= 0 else None,
    )
    text = sp.decode(sp.encode(prompt) + new)
    print(text)
    return text
