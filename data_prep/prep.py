#!/usr/bin/env python
"""Prepare the shards of a recipe's data section: the same as `msllm prep RECIPE [--force]`.

    python data_prep/prep.py recipes/quickstart.yaml [--force] [--set data.seq_len=1024]

Trains (or copies) the sentencepiece tokenizer and writes data.shards_dir/{train,validation}/
MDS shards, tokenizer.model and manifest.json. All the logic is in msllm.data.prepare.
"""

import sys

from msllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", *sys.argv[1:]]))
