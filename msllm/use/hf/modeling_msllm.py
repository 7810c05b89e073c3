"""An msllm model (bottom-up, top-down, retina, or vanilla with local attention) as a Hugging Face
causal LM: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

`MsllmForCausalLM.model` is msllm's own model (the classes above, built by `construct` from
`config.msllm`), so its logits are msllm's. Its forward returns a CausalLMOutputWithPast:
- with `use_cache` (the default) outside autograd, the logits come from msllm's cached decoding
  and `past_key_values` is its cache (an msllm DecodeCache, not a transformers Cache): passed
  back with the next tokens, they continue the sequence, each token costing one pass over
  itself. `generate()` does this for greedy search and sampling (a model with a learned-chunking
  scale, `pool: dynamic`, has no cached decoding: it takes the plain forward below);
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

from .configuration_msllm import MsllmConfig


class MsllmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MsllmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # Its cache is msllm's own: generate() must not make a transformers Cache for it.
    _is_stateful = True

    def __init__(self, config: MsllmConfig):
        super().__init__(config)
        model_config = config.model_config()
        # The plain constructor: transformers loads every weight (and may build on the meta device).
        self.model = construct(model_config)
        # A learned-chunking scale (pool: dynamic) has no cached decoding: each step runs the whole sequence.
        self.decodes = not any(scale.pool == "dynamic" for scale in model_config.scales)
        if config.tie_word_embeddings:
            self._tied_weights_keys = ["model.lm_head.weight"]
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: every weight comes from the export (msllm's initial values are its trainer's)."""

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
        **unused,  # position_ids, cache_position, return_dict, ...: msllm counts positions itself
    ) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("msllm models take input_ids (inputs_embeds are not supported)")
        _check_right_padded(attention_mask)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None or (use_cache and self.decodes and not torch.is_grad_enabled()):
            cache = self.model.new_cache() if past_key_values is None else past_key_values
            logits = self.model.decode(input_ids, cache)
        else:
            cache = None
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=None, **unused):
        """The tokens the cache has not seen yet (all of them on the first step, or without a cache)."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.position:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def _reorder_cache(self, past_key_values, beam_idx):
        raise NotImplementedError("beam search reorders the cache, which msllm's cache cannot: pass use_cache=False")


def _check_right_padded(attention_mask: torch.Tensor | None) -> None:
    """msllm models see every position: a mask may only end in zeros (right padding)."""
    if attention_mask is None:
        return
    padding = attention_mask == 0
    if (padding[:, :-1] & ~padding[:, 1:]).any():
        raise ValueError("msllm models take no padding mask: pad on the right (padding_side='right'), or pass "
                         "one prompt at a time")
