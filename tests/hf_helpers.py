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

from model_helpers import tiny_fields
from msllm.config import DataConfig, ModelConfig, Recipe, ScaleConfig, TokenizerConfig
from msllm.models.registry import ARCHS as REGISTERED

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
# Every registered architecture (msllm.models.registry) is exported: one not named above with its spec's tiny model.
ARCHS.update({arch: tiny_fields(arch) for arch in REGISTERED if arch not in {c["arch"] for c in ARCHS.values()}})

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


# The other major of transformers that the exports are tested under (the test environment has
# the newest, 5.x: pyproject resolves to it), in a venv of its own (transformers_4_python).
TRANSFORMERS_4 = "4.57.6"


def transformers_4_python() -> Path:
    """The Python of a venv that has transformers TRANSFORMERS_4 and the two packages it needs
    older versions of (huggingface-hub, tokenizers), and takes everything else (torch, numpy,
    safetensors, ...) from this test environment's site-packages, which a .pth file appends to its
    sys.path: a few MB and about 10 s from pip's cache, made once per test environment and kept
    under ~/.cache/msllm-test (MSLLM_TEST_CACHE), keyed by the versions. msllm is not importable
    there either (this environment's .pth files, its editable msllm among them, are not read)."""
    import hashlib
    import sysconfig

    from filelock import FileLock

    base = sysconfig.get_paths()["purelib"]
    key = hashlib.sha1(f"{sys.version}|{base}|{TRANSFORMERS_4}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("MSLLM_TEST_CACHE", Path.home() / ".cache" / "msllm-test"))
    venv = root / f"transformers-{TRANSFORMERS_4}-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
    python = venv / "bin" / "python"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv) + ".lock"):
        if (venv / "ready").is_file():
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "msllm-test-base.pth").write_text(base + "\n")  # after its own site-packages
        install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                                  "--disable-pip-version-check", f"transformers=={TRANSFORMERS_4}"],
                                 capture_output=True, text=True)
        if install.returncode:
            raise RuntimeError(f"cannot install transformers {TRANSFORMERS_4} into {venv}:\n{install.stderr[-3000:]}")
        (venv / "ready").write_text(TRANSFORMERS_4 + "\n")
    return python


def run_isolated(script: str, *args: str | Path, cwd: Path, timeout: float = 600,
                 python: str | Path = sys.executable) -> subprocess.CompletedProcess:
    """Run `script` in `python -I` (no PYTHONPATH, no user site, not the working directory on
    sys.path) after HIDE_MSLLM, offline, with its own Hugging Face cache under cwd. `python`:
    another interpreter (transformers_4_python)."""
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
    command = [str(python), "-I", "-c", HIDE_MSLLM + script, *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
