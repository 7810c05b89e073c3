"""Training on DeepSpeed: the loop and the pieces it is built from.

    trainer.py      `train(recipe)` and the Trainer: the loop
    schedule.py     what is due at each step (StepPlan), agreed by every rank; stop requests
    engine.py       AdamW parameter groups, the learning-rate schedule, the DeepSpeed config and engine
    loss.py         the one loss: never all the logits at once (chunked, dense, liger, cce)
    nonfinite.py    never apply a non-finite update; a streak of them becomes a stop
    callbacks.py    the components fed each step's metrics: console, metrics.jsonl, TensorBoard, eval
    evaluate.py     validation loss / perplexity / bits per byte over a loader
    bare.py         the bare training step (no DeepSpeed) that the benchmarks measure
    memory.py       the memory of one training step (StepMemory), computed and measured on the bare step

Checkpoints and the training state are msllm.checkpoint's; the distributed layer is
msllm.distributed's; the commands that use a trained model are msllm.use's.
"""
