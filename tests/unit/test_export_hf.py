"""The Hugging Face folder of `msllm export` (hf/), for every architecture: transformers loads it in
a fresh process in which msllm cannot be imported, with msllm's logits (1e-4, fp32) and msllm's
greedy tokens (cached and not), and its tokenizer encodes the built-in corpus's validation text as
msllm's sentencepiece tokenizer does; under both majors of transformers: 5 (this environment's)
and 4 (TRANSFORMERS_4, in a venv of its own: fixtures.hf.transformers_4_python). Tiny random
models, exported with msllm's exporter."""

from __future__ import annotations

import ast
import inspect
import json
import os
import stat
import sys

import pytest
import torch

from fixtures.hf import (
    ARCHS,
    SEQ_LEN,
    TRANSFORMERS_4,
    export_random_model,
    run_isolated,
    transformers_4_python,
    wiki_tokenizer,
)
from fixtures.train import check, msllm
from msllm.config import ModelConfig

pytestmark = pytest.mark.slow

NAMES = sorted(ARCHS)
PROMPTS = ["The history of the city", "In 1850 the river"]
NEW_TOKENS = 24

# Runs in the isolated process: every export through transformers alone.
TRANSFORMERS_SIDE = r"""
import json, sys
from pathlib import Path
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

root = Path(sys.argv[1])
inputs = torch.load(root / "inputs.pt")
validation = json.loads((root / "validation.json").read_text())
results = {"transformers": transformers.__version__}
for name in inputs["names"]:
    folder = root / name / "hf"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    # transformers 5 reads config.json (an msllm model's has an auto_map) for any tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    # sentencepiece itself, for whole documents: transformers 4's LlamaTokenizer (5 has none)
    slow = transformers.LlamaTokenizer.from_pretrained(folder) if transformers.__version__ < "5" else None
    out = {"class": type(model).__name__, "tokenizers": [type(tokenizer).__name__, type(slow).__name__]}
    out["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        out["logits"] = model(inputs["ids"]).logits
        out["logits_no_cache"] = model(inputs["ids"], use_cache=False).logits
    out["logits_grad_mode"] = model(inputs["ids"]).logits.detach()  # autograd on: the plain forward pass
    for cache in (True, False):
        out[f"generate_cache_{cache}"] = [
            model.generate(torch.tensor([p]), max_new_tokens=inputs["new_tokens"], do_sample=False,
                           use_cache=cache)[0, len(p):].tolist()
            for p in inputs["prompts"]]
    same = inputs["same_length_prompts"]
    out["generate_batch"] = model.generate(torch.tensor(same), max_new_tokens=inputs["new_tokens"],
                                           do_sample=False)[:, len(same[0]):].tolist()
    lines = [line for text in validation for line in text.splitlines()]
    out["lines"] = [tokenizer(line)["input_ids"] for line in lines]
    out["documents"] = [tokenizer(text)["input_ids"] for text in validation]
    out["documents_slow"] = [slow(text)["input_ids"] for text in validation] if slow else None
    out["decoded"] = [tokenizer.decode(ids) for ids in out["documents"]]
    out["special"] = [[t.bos_token_id, t.eos_token_id, t.pad_token_id] for t in (tokenizer, slow) if t]
    try:
        model(inputs["ids"][:, :5], attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
        out["left_padding"] = "accepted"
    except ValueError as exc:
        out["left_padding"] = str(exc)
    results[name] = out
torch.save(results, root / "results.pt")
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, made_once):
    """(root, {name: msllm model}, tokenizer path, validation documents): each ARCHS model exported
    to root/name."""
    tokenizer, validation = wiki_tokenizer(made_once)
    root = tmp_path_factory.mktemp("hf_exports")
    models = {name: export_random_model(name, tokenizer, root / name) for name in NAMES}
    return root, models, tokenizer, validation


@pytest.fixture(scope="module")
def sp(exports):
    from msllm.data.tokenizer import load_sentencepiece

    return load_sentencepiece(exports[2])


@pytest.fixture(scope="module")
def prompts(sp):
    return [[sp.eos_id()] + sp.encode(text) for text in PROMPTS]  # msllm generate's prompts


@pytest.fixture(scope="module", params=["5", "4"], ids=["transformers5", "transformers4"])
def transformers_side(request, exports, prompts, sp):
    """What transformers (major `request.param`) computes from every hf/ folder, in one fresh
    process without msllm."""
    root, _, _, validation = exports
    n = min(len(p) for p in prompts)
    ids = torch.randint(0, sp.GetPieceSize(), (2, 45), generator=torch.Generator().manual_seed(0))
    torch.save(
        {
            "names": NAMES,
            "ids": ids,
            "prompts": prompts,
            "same_length_prompts": [p[:n] for p in prompts],
            "new_tokens": NEW_TOKENS,
        },
        root / "inputs.pt",
    )
    (root / "validation.json").write_text(json.dumps(validation))
    python = sys.executable if request.param == "5" else transformers_4_python()
    check(run_isolated(TRANSFORMERS_SIDE, root, cwd=root, python=python))
    results = torch.load(root / "results.pt")
    version = results.pop("transformers")
    assert version.split(".")[0] == request.param and (request.param == "5" or version == TRANSFORMERS_4), version
    return ids, results, request.param


def test_the_isolated_process_cannot_import_msllm(tmp_path):
    proc = run_isolated("import msllm", cwd=tmp_path)
    assert proc.returncode == 1 and "No module named 'msllm'" in proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_hf_folder(exports, sp, name):
    root = exports[0]
    hf = root / name / "hf"
    config = json.loads((hf / "config.json").read_text())
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    assert ids == {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}  # msllm's tokenizers
    assert {k: config[k] for k in ids} == ids
    assert json.loads((hf / "generation_config.json").read_text()) == {**ids, "max_length": SEQ_LEN}
    tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False and tokenizer_config["add_eos_token"] is False
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer_json = json.loads((hf / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["type"] == "Unigram" and tokenizer_json["post_processor"] is None
    assert len(tokenizer_json["model"]["vocab"]) == sp.GetPieceSize()
    code = sorted(p.name for p in hf.glob("*.py"))
    if name == "vanilla":
        assert config["architectures"] == ["LlamaForCausalLM"] and code == []
    else:
        assert config["model_type"] == "msllm" and config["architectures"] == ["MsllmForCausalLM"]
        assert config["auto_map"] == {
            "AutoConfig": "configuration_msllm.MsllmConfig",
            "AutoModelForCausalLM": "modeling_msllm.MsllmForCausalLM",
        }
        assert code == ["configuration_msllm.py", "modeling_msllm.py"]
        assert config["msllm"]["arch"] == ARCHS[name]["arch"] and config["max_position_embeddings"] == SEQ_LEN
    files = [p for p in (root / name).rglob("*") if p.is_file()]
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(os.stat(p).st_mode) for p in files}
    assert len(set(modes.values())) == 1, modes  # safetensors writes 0600: the export fixes it
    assert len(files) == (11 if name == "vanilla" else 13)  # 5 of msllm, 6 (or 8) in hf/


@pytest.mark.parametrize("name", NAMES)
def test_transformers_gives_msllms_logits_without_msllm(exports, transformers_side, name):
    _, models, _, _ = exports
    ids, results, _ = transformers_side
    out = results[name]
    assert out["class"] == ("LlamaForCausalLM" if name == "vanilla" else "MsllmForCausalLM")
    assert out["tied"] == ARCHS[name].get("tie_embeddings", ModelConfig().tie_embeddings)  # one tensor, as in msllm
    with torch.no_grad():
        ours = models[name](ids)
    for key in ("logits", "logits_no_cache", "logits_grad_mode"):
        assert (out[key] - ours).abs().max().item() <= 1e-4, key


@pytest.mark.parametrize("name", NAMES)
def test_transformers_generate_gives_msllm_generates_greedy_tokens(exports, transformers_side, prompts, sp, name):
    from msllm.use.generate import generate

    _, models, _, _ = exports
    out = transformers_side[1][name]
    ours = [generate(models[name], [p], NEW_TOKENS, temperature=0.0, stop_id=sp.eos_id())[0] for p in prompts]

    def until_eos(row):  # transformers keeps the EOS it stops at (and pads a batch's finished rows after it)
        return row[: row.index(sp.eos_id())] if sp.eos_id() in row else row

    for cache in (True, False):
        assert [until_eos(row) for row in out[f"generate_cache_{cache}"]] == ours, f"use_cache={cache}"
    n = min(len(p) for p in prompts)
    batch = generate(models[name], [p[:n] for p in prompts], NEW_TOKENS, temperature=0.0, stop_id=sp.eos_id())
    assert [until_eos(row) for row in out["generate_batch"]] == batch
    assert len({tuple(row) for row in ours}) == 2 and all(len(row) >= 5 for row in ours)  # varied, not stopped at once


@pytest.mark.parametrize("name", ["vanilla", "bottom_up"])
def test_auto_tokenizer_encodes_the_validation_text_as_msllm(exports, transformers_side, sp, name):
    """AutoTokenizer's (tokenizer.json, the same under both majors) on every line of the validation
    text, and transformers 4's LlamaTokenizer (sentencepiece itself) on whole documents, as msllm's
    data preparation encodes them. On whole documents of thousands of tokens the fast one may
    differ: sentencepiece sums its path scores in float32, so the ids it gives a paragraph depend on
    how much text comes before it (docs/using.md, Export); it decodes them back all the same."""
    validation = exports[3]
    _, results, major = transformers_side
    out = results[name]
    fast = "PreTrainedTokenizerFast" if major == "4" else "TokenizersBackend"  # 5's name; the other its alias
    assert out["tokenizers"] == [fast, "LlamaTokenizer" if major == "4" else "NoneType"]
    assert out["special"] == [[sp.bos_id(), sp.eos_id(), sp.pad_id()]] * (2 if major == "4" else 1)
    lines = [line for text in validation for line in text.splitlines()]
    assert len(lines) >= 500 and sum(map(len, validation)) > 50_000
    assert out["lines"] == [sp.encode(line) for line in lines]  # no BOS: msllm's documents have none
    if major == "4":
        assert out["documents_slow"] == [sp.encode(text) for text in validation]
    assert out["decoded"] == validation


def test_msllm_models_refuse_a_left_padded_mask(transformers_side):
    out = transformers_side[1]["bottom_up"]
    assert out["left_padding"].startswith("msllm models take no padding mask: pad on the right")


def test_msllm_export_of_an_export(exports, tmp_path):
    """The command, on an export of a non-vanilla model: the same hf/ folder."""
    root = exports[0]
    proc = check(msllm("export", root / "retina", "--out", tmp_path / "again"))
    assert "and hf/ (MsllmForCausalLM, trust_remote_code)" in proc.stdout
    for file in (
        "config.json",
        "modeling_msllm.py",
        "configuration_msllm.py",
        "model.safetensors",
        "tokenizer_config.json",
    ):
        assert (tmp_path / "again" / "hf" / file).read_bytes() == (root / "retina" / "hf" / file).read_bytes(), file


def test_the_modeling_file_is_msllms_own_source(exports):
    """Every function and class of msllm/models is in modeling_msllm.py exactly as msllm has it."""
    import importlib

    import msllm.models
    from msllm.models import attention, decoding, layers, registry, spec
    from msllm.models.attention import cache, kernels, patterns
    from msllm.models.attention import modules as cores

    text = (exports[0] / "retina" / "hf" / "modeling_msllm.py").read_text()
    # The shared blocks, and each registered architecture's folder: its spec, its model, its config.
    archs = [
        importlib.import_module(f"{s.model.__module__.rsplit('.', 1)[0]}{part}")
        for s in registry.SPECS.values()
        for part in ("", ".model", ".config")
    ]
    modules = [msllm.models, attention, cache, kernels, cores, patterns, decoding, layers, registry, spec, *archs]
    count = 0
    for module in modules:
        for name, value in vars(module).items():
            if (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == module.__name__:
                assert inspect.getsource(value) in text, f"{module.__name__}.{name}"
                count += 1
    assert count >= 40
    imported = {a.name for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name and name.split(".")[0] == "msllm"}
    assert "configuration_msllm" in imported  # the sibling file, relatively


def test_an_unknown_key_in_the_msllm_config_is_named(exports, tmp_path):
    folder = exports[0] / "top_down" / "hf"
    config = json.loads((folder / "config.json").read_text())
    config["msllm"]["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_msllm.py").write_bytes((folder / "configuration_msllm.py").read_bytes())
    proc = run_isolated(
        "from transformers import AutoConfig\nAutoConfig.from_pretrained('.', trust_remote_code=True)", cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "ValueError: config.json: msllm: unknown keys ['n_layers']" in proc.stderr
