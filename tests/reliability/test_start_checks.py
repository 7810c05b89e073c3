"""Issue 32 (third round), item 3: values that cannot run here are one line at start, before
DeepSpeed or a batch is allocated: a train.precision the accelerator does not compute in, a
micro-batch whose activations cannot fit, and a Hugging Face Llama folder (`msllm import-hf`,
`train.init_from`) with a FIFO or a device named like one of its files, a malformed config.json
value, or weights of another shape than its config.json says."""

from __future__ import annotations

import json
import os
import resource

import pytest

from fixtures.reliability import LLAMA_CONFIG, cli, one_line, one_line_error, tree_digest, write_llama_folder
from fixtures.train import make_recipe, msllm

HUGE = 2**40

# A CPU without fp16 kernels (no AVX512-FP16 / AMX-FP16), as DeepSpeed's CPU accelerator sees it.
NO_FP16 = """
import deepspeed.accelerator.cpu_accelerator as _cpu
_cpu.CPU_Accelerator.is_fp16_supported = lambda self: False
"""


@pytest.mark.slow
def test_fp16_on_a_cpu_without_fp16_is_one_line(tmp_path, tiny_data):
    """Probe class: a precision the accelerator does not support (fp16 on a CPU without fp16 kernels)."""
    recipe, out = make_recipe(tmp_path, tiny_data, train={"precision": "fp16"})
    line = one_line_error(msllm("train", recipe, python_code=NO_FP16), "train")
    assert "train.precision fp16 is not supported on this cpu (DeepSpeed: fp16 needs a GPU" in line, line
    assert line.endswith("set train.precision to fp32 or bf16")
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, shown",
    [
        (
            "train.micro_batch_size",
            "lower train.micro_batch_size (raise train.grad_accum_steps to keep the global batch)",
        ),
        ("eval.micro_batch_size", "lower eval.micro_batch_size"),
    ],
)
@pytest.mark.slow
def test_a_micro_batch_that_cannot_fit_is_one_line(tmp_path, tiny_data, key, shown):
    """Probe class: a micro-batch of 2**40 samples (its activations checked before any batch is drawn)."""
    recipe, out = make_recipe(tmp_path, tiny_data)
    line = one_line_error(msllm("train", recipe, "--set", f"{key}={HUGE}"), "train")
    assert f"{key} {HUGE:,} does not fit: one micro-batch's activations need at least " in line, line
    assert "a lower bound" in line and line.endswith(shown)
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_msllm_eval_refuses_a_micro_batch_that_cannot_fit(run_copy):
    """Probe class: `msllm eval` with eval.micro_batch_size 2**40."""
    recipe, out = run_copy
    before = tree_digest(out)
    line = one_line_error(msllm("eval", recipe, "--checkpoint", out, "--set", f"eval.micro_batch_size={HUGE}"), "eval")
    assert f"eval.micro_batch_size {HUGE:,} does not fit" in line and line.endswith("lower eval.micro_batch_size")
    assert tree_digest(out) == before


def _llama_with_weights(tmp_path, tiny_data, wrong_shape: str | None = None):
    """A Llama folder of LLAMA_CONFIG with its weights (random, msllm's init), one of them
    `wrong_shape` (a Llama name) one row longer if given."""
    import torch
    from safetensors.torch import save_file

    from msllm.checkpoint.llama import model_section_from_llama, to_llama_names
    from msllm.config import ModelConfig, ScaleConfig
    from msllm.models import construct

    folder = write_llama_folder(tmp_path / "llama", tiny_data[1] / "tokenizer.model")
    section = model_section_from_llama(dict(LLAMA_CONFIG), "LLAMA_CONFIG")
    model = construct(ModelConfig(**{**section, "scales": [ScaleConfig(**section["scales"][0])]}))
    state = to_llama_names({k: v.detach() for k, v in model.named_parameters()}, tie=False)
    if wrong_shape:
        state[wrong_shape] = torch.zeros(state[wrong_shape].shape[0] + 1, *state[wrong_shape].shape[1:])
    save_file(state, str(folder / "model.safetensors"))
    return folder, section


def _init_from_recipe(tmp_path, tiny_data, folder, section):
    return make_recipe(
        tmp_path,
        tiny_data,
        model=section,
        train={"init_from": str(folder), "max_steps": 1},
        eval={"every": 0, "max_batches": 1},
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_init_from_weights_that_are_a_fifo_or_a_device_are_one_line(tmp_path, tiny_data, kind):
    """Probe class: a FIFO (would block forever) or a device (/dev/zero, endless) named model.safetensors."""
    folder, section = _llama_with_weights(tmp_path, tiny_data)
    weights = folder / "model.safetensors"
    weights.unlink()
    if kind == "fifo":
        os.mkfifo(weights)
    else:
        weights.symlink_to("/dev/zero")
    recipe, out = _init_from_recipe(tmp_path, tiny_data, folder, section)
    line = one_line_error(msllm("train", recipe, timeout=120), "train")
    shown = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    assert f"{weights} is {shown}, not a file: {folder} holds it as a weights file" in line, line
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_init_from_weights_of_another_shape_are_one_line(tmp_path, tiny_data):
    """Probe class: a safetensors tensor whose shape is not what config.json makes it."""
    folder, section = _llama_with_weights(tmp_path, tiny_data, wrong_shape="model.layers.1.mlp.up_proj.weight")
    recipe, out = _init_from_recipe(tmp_path, tiny_data, folder, section)
    line = one_line_error(msllm("train", recipe), "train")
    assert (
        f"train.init_from {folder}: model.layers.1.mlp.up_proj.weight has shape [161, 64], but its config.json "
        "makes it [160, 64]: the weights are not those of this config.json"
    ) in line, line
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_init_from_a_malformed_config_is_one_line(tmp_path, tiny_data):
    """Probe class: a malformed config.json value (num_attention_heads 0) read by train.init_from."""
    folder, section = _llama_with_weights(tmp_path, tiny_data)
    (folder / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "num_attention_heads": 0}))
    recipe, out = _init_from_recipe(tmp_path, tiny_data, folder, section)
    line = one_line_error(msllm("train", recipe), "train")
    assert f"{folder}/config.json: num_attention_heads 0 is not a positive integer: fix it in config.json" in line, line
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "key, value, what",
    [
        ("hidden_size", "sixty-four", "'sixty-four' is not a positive integer"),
        ("num_attention_heads", 0, "0 is not a positive integer"),
        ("num_hidden_layers", [2], "[2] is not a positive integer"),
        ("vocab_size", True, "True is not a positive integer"),
        ("rms_norm_eps", "small", "'small' is not a positive number"),
        ("rope_theta", -1.0, "-1.0 is not a positive number"),
    ],
)
def test_import_hf_malformed_config_value_is_one_line(tmp_path, tiny_data, capsys, key, value, what):
    """Probe class: a malformed config.json value given to `msllm import-hf`."""
    folder = write_llama_folder(tmp_path / "llama", tiny_data[1] / "tokenizer.model", **{key: value})
    code, _, err = cli(capsys, "import-hf", folder, "--out", tmp_path / "r.yaml")
    line = one_line(code, err, "import-hf")
    assert f"{folder}/config.json: {key} {what}: fix it in config.json" in line, line
    assert not (tmp_path / "r.yaml").exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.model"])
def test_import_hf_fifo_in_the_folder_is_one_line(tmp_path, tiny_data, capsys, name):
    """Probe class: a FIFO named config.json or tokenizer.model given to `msllm import-hf`."""
    folder = write_llama_folder(tmp_path / "llama", tiny_data[1] / "tokenizer.model")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    code, _, err = cli(capsys, "import-hf", folder, "--out", tmp_path / "r.yaml")
    assert f"{folder / name} is a FIFO (named pipe), not a file" in one_line(code, err, "import-hf")
    assert not (tmp_path / "r.yaml").exists()


def _address_space_of(gib: float):
    """A preexec_fn: the child runs under `ulimit -v` of `gib` GiB (RLIMIT_AS)."""

    def limit():
        size = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return limit


@pytest.mark.slow
@pytest.mark.parametrize("gib", [1, 2])
def test_an_address_space_limit_too_small_for_torch_is_one_line(tmp_path, tiny_data, trained_run, gib):
    """Probe class: ulimits (`ulimit -v` of 1 and 2 GiB: the loader cannot map libtorch's segments).
    It was an ImportError traceback; now every command that imports torch says, in one line, that
    the address-space limit is too small and how to raise it."""
    recipe, run = make_recipe(tmp_path, tiny_data)
    _, trained = trained_run
    for args in (("train", recipe), ("eval", recipe, "--checkpoint", trained), ("generate", trained, "--prompt", "A")):
        line = one_line_error(msllm(*args, preexec_fn=_address_space_of(gib)), args[0])
        assert "libtorch" in line and "failed to map segment" in line, line
        assert f"the address-space limit (ulimit -v) of {gib:.1f} GiB is too small for PyTorch" in line, line
        assert "raise it (ulimit -v unlimited) and rerun" in line, line
    assert not run.exists()
