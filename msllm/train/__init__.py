"""Training, evaluation, checkpoints, export and generation on DeepSpeed.

    trainer.py      `train(recipe)`: the loop, built from small pieces below
    dist.py         launcher environment (torchrun, deepspeed, srun, single process) and collectives
    optim.py        AdamW parameter groups, the learning-rate schedule, the DeepSpeed config
    callbacks.py    console line, metrics.jsonl, TensorBoard, checkpoints, eval, preemption
    checkpoint.py   complete-marker checkpoints, resume, pruning, consolidated weights
    evaluate.py     loss / perplexity / bits per byte, and `msllm eval`
    export.py       safetensors export and the Hugging Face Llama folder
    generate.py     sampling from a checkpoint or an export
"""
