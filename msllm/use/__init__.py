"""Using a trained model: the commands over one loader.

    load.py       load_model(source) -> LoadedModel(model, recipe, meta, tokenizer, path, kind):
                  a checkpoint, a run's output_dir or an export, checked on the way
    evaluate.py   `msllm eval`: the validation bits per byte of a loaded model on a recipe's data
    generate.py   `msllm generate`: sampling
    export.py     `msllm export`: consolidated safetensors (+ a Hugging Face folder)
"""
