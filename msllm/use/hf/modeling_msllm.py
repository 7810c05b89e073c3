"""An msllm model (bottom-up, top-down, retina, or vanilla with local attention) as a Hugging Face
causal LM: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

`MsllmForCausalLM.model` is msllm's own model (the classes above, built by `construct` from
`config.msllm`), so its logits are msllm's. It runs under transformers 4.57+ and 5. Its forward
returns a CausalLMOutputWithPast:
- with `use_cache` (the default) outside autograd, the logits come from msllm's cached decoding
  and the output's cache (`past_key_values` in transformers 4, `cache` in transformers 5) is
  msllm's own (an MsllmCache around a DecodeCache, not a transformers Cache): passed back with
  the next tokens (under either name), it continues the sequence, each token costing one pass
  over itself. `generate()` does this for greedy search and sampling (a model with a
  learned-chunking scale, `pool: dynamic`, has no cached decoding: it takes the plain forward
  below);
- otherwise (training, `use_cache=False`) it is the plain forward pass over the whole sequence,
  and `labels` give the mean next-token cross-entropy as `loss`.
msllm models take no padding mask: an `attention_mask` may only end in zeros (right padding,
which a causal model never sees from the positions before it). Beam search needs
`use_cache=False` (msllm's cache cannot reorder its rows).

This file is a template of `msllm export` (msllm/use/hf/assemble.py): the export inlines the
msllm modules imported below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from msllm.models import construct
from msllm.models.decoding import DecodeCache
from msllm.models.layers import Rotary

from .configuration_msllm import MsllmConfig

# The name of the cache in a model's inputs and outputs: transformers 5 renamed past_key_values.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MsllmCache:
    """msllm's decoding cache (a DecodeCache) as transformers' generate() handles a model's cache:
    it asks its length, whether it can be compiled or cropped (neither), and passes it back."""

    is_compileable = False
    is_croppable = False

    def __init__(self, decode_cache: DecodeCache):
        self.decode_cache = decode_cache

    @property
    def position(self) -> int:
        """The tokens seen so far."""
        return self.decode_cache.position

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.decode_cache.position


class MsllmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MsllmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # Its cache is msllm's own: generate() must not make a transformers Cache for it (transformers
    # 4 reads _is_stateful, 5 asks _supports_default_dynamic_cache).
    _is_stateful = True

    def __init__(self, config: MsllmConfig):
        super().__init__(config)
        model_config = config.model_config()
        # The plain constructor: transformers loads every weight (and may build on the meta device).
        self.model = construct(model_config)
        # A learned-chunking scale (pool: dynamic) has no cached decoding: each step runs the whole sequence.
        self.decodes = not any(scale.pool == "dynamic" for scale in model_config.scales)
        if config.tie_word_embeddings:
            # {tied: source}, as transformers 5 has it; transformers 4 reads the keys (the tied ones)
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:
        """No weight: every weight comes from the export (msllm's initial values are its trainer's).
        Only what the export does not hold, msllm's one non-persistent buffer (the rotary
        frequencies): transformers 5 builds the model on the meta device and leaves it empty."""
        if isinstance(module, Rotary):
            with torch.device(module.inv_freq.device):
                fresh = Rotary(2 * module.inv_freq.numel(), self.config.model_config().rope_theta).inv_freq
            with torch.no_grad():
                module.inv_freq.copy_(fresh)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: MsllmCache | DecodeCache | None = None,  # transformers 5's name of past_key_values
        **unused,  # position_ids, cache_position, return_dict, ...: msllm counts positions itself
    ) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("msllm models take input_ids (inputs_embeds are not supported)")
        _check_right_padded(attention_mask)
        past = _msllm_cache(cache if cache is not None else past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past is not None or (use_cache and self.decodes and not torch.is_grad_enabled()):
            past = MsllmCache(self.model.new_cache()) if past is None else past
            logits = self.model.decode(input_ids, past.decode_cache)
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: past})

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=None, cache=None, **unused
    ):
        """The tokens the cache has not seen yet (all of them on the first step, or without a cache)."""
        past = _msllm_cache(cache if cache is not None else past_key_values)
        if past is not None:
            input_ids = input_ids[:, past.position :]
        return {"input_ids": input_ids, CACHE_NAME: past, "attention_mask": attention_mask, "use_cache": use_cache}

    def _reorder_cache(self, past_key_values, beam_idx):
        raise NotImplementedError("beam search reorders the cache, which msllm's cache cannot: pass use_cache=False")


def _msllm_cache(cache) -> MsllmCache | None:
    """The msllm cache passed to forward (a bare DecodeCache is taken too); None for none, or for
    an empty transformers Cache (which a caller may make for any model); a ValueError for one that
    holds tokens (it is not msllm's: msllm cannot continue from it)."""
    if cache is None or isinstance(cache, MsllmCache):
        return cache
    if isinstance(cache, DecodeCache):
        return MsllmCache(cache)
    if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
        return None
    raise ValueError(
        f"msllm models keep their own cache: pass back the one their forward returned, not a {type(cache).__name__}"
    )


def _check_right_padded(attention_mask: torch.Tensor | None) -> None:
    """msllm models see every position: a mask may only end in zeros (right padding)."""
    if attention_mask is None:
        return
    padding = attention_mask == 0
    if (padding[:, :-1] & ~padding[:, 1:]).any():
        raise ValueError(
            "msllm models take no padding mask: pad on the right (padding_side='right'), or pass one prompt at a time"
        )
