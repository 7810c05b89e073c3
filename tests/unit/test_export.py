"""`msllm export`: safetensors + config + recipe + tokenizer, and a Hugging Face Llama folder for
vanilla that transformers loads with the same logits; then `msllm generate` from the export."""

from __future__ import annotations

import json

import pytest

from fixtures.train import check, msllm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference_run):
    _, out, _ = reference_run
    dest = tmp_path_factory.mktemp("export") / "tiny"
    proc = check(msllm("export", out, "--out", dest))
    assert "and hf/ (LlamaForCausalLM)" in proc.stdout
    return out, dest


def test_export_folder(exported):
    _, dest = exported
    for name in (
        "model.safetensors",
        "config.json",
        "recipe.yaml",
        "tokenizer.model",
        "export.json",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.model",
        "hf/tokenizer_config.json",
        "hf/generation_config.json",
    ):
        assert (dest / name).is_file(), name
    assert json.loads((dest / "config.json").read_text())["arch"] == "vanilla"
    assert json.loads((dest / "export.json").read_text())["step"] == 12
    hf_config = json.loads((dest / "hf" / "config.json").read_text())
    assert [hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [2, 3, 0]  # msllm's tokenizer
    assert not list(dest.parent.glob(".tiny.*"))  # no temporary folder left behind


def test_hf_llama_gives_the_same_logits(exported):
    import torch
    from transformers import LlamaForCausalLM

    from msllm.use.load import load_model

    _, dest = exported
    loaded = load_model(dest)
    ours, cfg = loaded.model, loaded.recipe.model
    hf = LlamaForCausalLM.from_pretrained(str(dest / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_export_refuses_to_overwrite_without_force(exported):
    out, dest = exported
    marker = dest / "model.safetensors"
    before = marker.stat().st_mtime_ns
    proc = msllm("export", out, "--out", dest)
    assert proc.returncode == 2 and "already exists: pass --force" in proc.stderr
    assert marker.stat().st_mtime_ns == before
    check(msllm("export", out / "checkpoints" / "step_0000006", "--out", dest, "--force"))
    assert json.loads((dest / "export.json").read_text())["step"] == 6


def test_generate_from_export_and_checkpoint(exported):
    out, dest = exported
    args = [
        "--prompt",
        "The old cat",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    a = check(msllm("generate", dest, *args)).stdout
    b = check(msllm("generate", dest, *args)).stdout
    assert a == b and a.startswith("The old cat")
    # The checkpoint the export came from samples the same text.
    source = json.loads((dest / "export.json").read_text())["checkpoint"]
    c = check(msllm("generate", source, *args)).stdout
    assert c == a
