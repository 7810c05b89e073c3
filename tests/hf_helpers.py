"""Shared pieces of the Hugging Face tests (test_export_hf.py, test_import_hf.py, test_lm_eval.py):
a tokenizer trained on the built-in corpus, tiny random models of each architecture exported with
msllm's exporter, and a runner for Python in a fresh process in which msllm cannot be imported.
Nothing is tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from msllm.config import DataConfig, ModelConfig, Recipe, ScaleConfig, TokenizerConfig

SEQ_LEN = 64

# Tiny models that cross every block boundary within a few dozen tokens (windows of 8, factors of
# 2), with the options that add parameters (attention aggregation, linear pooling, tied weights).
ARCHS = {
    "vanilla": dict(arch="vanilla", scales=[ScaleConfig(layers=2, attention="full")]),
    "vanilla_local": dict(arch="vanilla", scales=[ScaleConfig(layers=2, attention="local", window=8)]),
    "bottom_up": dict(arch="bottom_up", aggregation="attention", tie_embeddings=True, scales=[
        ScaleConfig(layers=1, attention="local", window=8), ScaleConfig(factor=2, layers=1), ScaleConfig(factor=2, layers=1)]),
    # Learned chunking (pool: dynamic): no cached decoding, so transformers' generate recomputes.
    "bottom_up_dynamic": dict(arch="bottom_up", scales=[
        ScaleConfig(layers=1, attention="local", window=8), ScaleConfig(layers=1, pool="dynamic", target_ratio=3.0)]),
    "top_down": dict(arch="top_down", pooling="linear", upsampling="linear", scales=[
        ScaleConfig(layers=1, attention="local", window=8), ScaleConfig(factor=2, layers=1)]),
    "retina": dict(arch="retina", retina_levels=3, retina_factor=2, scales=[ScaleConfig(layers=2, attention="local", window=8)]),
}

# Prepended to every isolated script: from here on `import msllm` fails, as where msllm is not
# installed (it is installed, editable, in the test environment: -I alone would not hide it).
HIDE_MSLLM = r'''
import importlib.abc, sys
class _HideMsllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "msllm" or name.startswith("msllm."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: msllm is not installed here)")
sys.meta_path.insert(0, _HideMsllm())
try:
    import msllm
except ModuleNotFoundError:
    pass
else:
    sys.exit("msllm is importable in the isolated process")
'''


def wiki_tokenizer(made_once) -> tuple[Path, list[str]]:
    """(a tokenizer.model trained on the train split of the built-in corpus, its validation
    documents), made once per test run (conftest's `made_once` fixture)."""
    from msllm.data.prepare import choose_split_rule
    from msllm.data.sources import iter_documents
    from msllm.data.tokenizer import train_tokenizer

    def make(folder: Path) -> None:
        data = DataConfig(source="wikipedia-sample")
        rule = choose_split_rule(data)
        documents = list(iter_documents(data))
        train_tokenizer([d for d in documents if rule.split_of(d) == "train"], TokenizerConfig(vocab_size=1000),
                        folder / "tokenizer.model", num_threads=2)
        (folder / "validation.json").write_text(json.dumps([d for d in documents if rule.split_of(d) == "validation"]))

    folder = made_once("hf_wiki_tokenizer", make)
    return folder / "tokenizer.model", json.loads((folder / "validation.json").read_text())


def random_model(name: str, vocab_size: int, seed: int = 0) -> tuple[torch.nn.Module, ModelConfig]:
    """A tiny model of ARCHS[name] with random weights (large enough to give varied tokens)."""
    from msllm.models import build_model

    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_heads=2, init_std=0.2, **ARCHS[name])
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def export_random_model(name: str, tokenizer: Path, out: Path):
    """Export (msllm.use.export.write_export) a random model of ARCHS[name]; return the model."""
    from msllm.data.tokenizer import file_sha256, load_tokenizer_file
    from msllm.use.export import write_export
    from msllm.use.load import LoadedModel

    sp = load_tokenizer_file(tokenizer)
    model, cfg = random_model(name, sp.vocab_size)
    recipe = Recipe(model=cfg, data=DataConfig(seq_len=SEQ_LEN))
    meta = {"step": 0, "tokens": 0, "tokenizer_sha256": file_sha256(tokenizer)}
    write_export(LoadedModel(model, recipe, meta, sp, tokenizer.parent, "export"), out)
    return model


def run_isolated(script: str, *args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `script` in `python -I` (no PYTHONPATH, no user site, not the working directory on
    sys.path) after HIDE_MSLLM, offline, with its own Hugging Face cache under cwd."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "HF_HOME": str(cwd / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-I", "-c", HIDE_MSLLM + script, *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
