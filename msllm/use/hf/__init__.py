"""The Hugging Face side of msllm (nothing here imports transformers; the two templates are read as
text, never imported by msllm).

    folder.py                 write_hf_folder: an export's hf/, for every architecture
    (vanilla <-> LlamaForCausalLM, the config and the parameter names: msllm.checkpoint.llama)
    assemble.py               the self-contained configuration_msllm.py and modeling_msllm.py of an
                              export, assembled from msllm's own sources and the two templates:
    configuration_msllm.py    template: MsllmConfig (transformers' PretrainedConfig)
    modeling_msllm.py         template: MsllmForCausalLM (PreTrainedModel, GenerationMixin)
"""
