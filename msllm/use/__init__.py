"""Using a trained model: the commands over one loader.

load.py       load_model(source) -> LoadedModel(model, recipe, meta, tokenizer, path, kind):
              a checkpoint, a run's output_dir or an export, checked on the way
evaluate.py   `msllm eval`: the validation bits per byte of a loaded model on a recipe's data;
              continuation_loglikelihoods: lm-evaluation-harness's requests, answered by msllm
generate.py   `msllm generate`: sampling
export.py     `msllm export`: consolidated safetensors and a Hugging Face folder (hf/)
import_hf.py  `msllm import-hf` and train.init_from: a run that starts from a Hugging Face Llama
hf/           the Hugging Face side: the hf/ folder, the Llama mapping, the assembled modeling files
"""
