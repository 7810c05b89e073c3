"""`msllm import-hf` and train.init_from: a vanilla run starts from a local Hugging Face Llama
folder (a small random LlamaForCausalLM saved here, with the tiny corpus's sentencepiece
tokenizer), and its logits are transformers' after the import."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from fixtures.train import base_recipe, check, error_lines, msllm, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tiny_data):
    """(folder, the LlamaForCausalLM saved there): random weights, untied, GQA-free, Llama-3's
    rope_theta and norm eps (not msllm's defaults: the import must read them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, shards = tiny_data
    folder = tmp_path_factory.mktemp("hf_llama") / "tiny-llama"
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights big enough that a wrong constant shows in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    shutil.copyfile(shards / "tokenizer.model", folder / "tokenizer.model")
    return folder, model


def test_imported_weights_give_transformers_logits(llama_folder):
    from msllm.checkpoint.llama import read_llama_folder
    from msllm.config import ModelConfig, ScaleConfig
    from msllm.models import build_model

    folder, hf = llama_folder
    llama = read_llama_folder(folder)
    section = dict(llama.model)
    assert section["rope_theta"] == 500000.0 and section["norm_eps"] == 1e-6 and section["mlp_hidden"] == 160
    model = build_model(ModelConfig(**{**section, "scales": [ScaleConfig(**section["scales"][0])]}))
    model.load_state_dict(llama.weights(), strict=True)
    ids = torch.randint(0, 320, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.eval()(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_a_run_starts_from_the_llama_folder(llama_folder, tiny_data, tmp_path):
    """import-hf writes the recipe; a run of one step at a negligible learning rate keeps the
    weights it started from, which are the Llama's: its checkpoint has transformers' logits."""
    from msllm.config import load_recipe
    from msllm.use.load import load_model

    folder, hf = llama_folder
    corpus, _ = tiny_data
    proc = check(msllm("import-hf", folder, "--out", tmp_path / "imported.yaml"))
    assert "vanilla, 2 layers, d_model 64, vocab 320" in proc.stdout
    recipe = yaml.safe_load((tmp_path / "imported.yaml").read_text())
    assert recipe["train"]["init_from"] == str(folder) and recipe["data"]["tokenizer"]["model"] == str(
        folder / "tokenizer.model"
    )
    load_recipe(tmp_path / "imported.yaml")  # a valid recipe as written
    tiny = base_recipe(tmp_path / "shards", corpus, tmp_path / "run")
    recipe["data"] = {**tiny["data"], "tokenizer": {"model": str(folder / "tokenizer.model")}}
    recipe["run"]["output_dir"] = str(tmp_path / "run")
    recipe["train"].update(max_steps=1, micro_batch_size=2, lr=1e-30, min_lr=0.0, warmup_steps=0)
    recipe["eval"] = {"every": 0, "max_batches": 1}
    check(msllm("train", write_recipe(tmp_path / "run.yaml", recipe)))
    loaded = load_model(tmp_path / "run")
    assert loaded.step == 1
    ids = torch.randint(0, 320, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (loaded.model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_import_refuses_what_msllm_cannot_represent(llama_folder, tmp_path):
    folder, _ = llama_folder
    gqa = tmp_path / "gqa"
    shutil.copytree(folder, gqa)
    config = json.loads((gqa / "config.json").read_text())
    (gqa / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    proc = msllm("import-hf", gqa, "--out", tmp_path / "r.yaml")
    assert proc.returncode == 2 and not (tmp_path / "r.yaml").exists()
    assert error_lines(proc) == [
        f"msllm import-hf: error: {gqa}/config.json: grouped-query attention "
        "(num_key_value_heads 2 != num_attention_heads 4): msllm's vanilla model cannot represent it"
    ]
    (gqa / "tokenizer.model").unlink()
    (gqa / "config.json").write_text(json.dumps(config))
    proc = msllm("import-hf", gqa, "--out", tmp_path / "r.yaml")
    assert proc.returncode == 2 and "no tokenizer.model: msllm needs the model's sentencepiece tokenizer" in proc.stderr


def test_a_run_refuses_a_llama_folder_of_another_model(llama_folder, tiny_data, tmp_path):
    folder, _ = llama_folder
    corpus, shards = tiny_data
    recipe = base_recipe(shards, corpus, tmp_path / "run")  # d_model 64, 2 layers: but msllm's rope_theta and eps
    recipe["train"]["init_from"] = str(folder)
    proc = msllm("train", write_recipe(tmp_path / "run.yaml", recipe))
    assert proc.returncode == 2, proc.stderr
    line = error_lines(proc)[-1]
    assert f"train.init_from {folder}: the recipe's model is not that Llama" in line
    assert "rope_theta 10000.0 vs 500000.0" in line and "norm_eps 1e-05 vs 1e-06" in line
