"""A run's checkpoints and its run folder.

state.py         TrainState: what a checkpoint holds (step, tokens seen, data loader, RNG, the
                 engine's weights and optimizer, the recipe, the tokenizer), with
                 meta / rank_state / files and load: the one place that decides it
checkpointer.py  Checkpointer: save, load (resume and its rules), verify, prune, set aside
files.py         the layout of a checkpoint folder, weights-only loading, checksums, and the
                 consolidated weights that eval, export and generate read without DeepSpeed
runfolder.py     the run-folder lock: one training per output_dir, never two runs mixed in it
llama.py         a Hugging Face Llama's weights and config <-> msllm's vanilla model: what export
                 writes, and what a run starts from (`train.init_from`, `msllm import-hf`)
"""
