"""The start-up check of the kernels (msllm.train.kernel_check), on the CPU.

A kernel made to fail (it raises) and one made wrong (its loss 1% high, its gradient 5% high, its
attention output 1% high) must be caught, for the attention and for the loss, in fallback mode (the
reference replaces it, one line says so, the record keeps it) and in strict mode (a one-line
KernelError). The real kernels pass: Liger's under Triton's interpreter, FlexAttention's compiled
forward (the CPU has no FlexAttention backward: forward only, said in the record). Through `msllm
train`: a run on liger checks it, trains, and writes the check into run.json; a run whose liger is
wrong trains on chunked and says why. Tolerances are kernel_check.TOLERANCES (fp32: loss 1e-4,
gradients and attention 1e-3, relative to the reference's largest magnitude).
"""

from __future__ import annotations

import json

import pytest
import torch

import msllm.models.attention.kernels as attention
import msllm.train.loss as loss_module
from fixtures.kernels import cpu_kernels  # noqa: F401 (a fixture)
from fixtures.launch import clean_env
from fixtures.models import tiny_model
from fixtures.train import make_recipe, msllm
from msllm.errors import KernelError
from msllm.models.attention import SlidingWindow, kernel_for
from msllm.models.retina import RetinaPattern
from msllm.train.kernel_check import TOLERANCES, attention_patterns, check_kernels
from msllm.train.loss import installed, lm_loss

CPU = torch.device("cpu")
PATTERNS = [SlidingWindow(8), RetinaPattern(4, 2, 3)]


@pytest.fixture(autouse=True)
def no_forced_attention_kernel(monkeypatch):
    """A fallback fixes the attention kernel for the process: undone after each test."""
    monkeypatch.setattr(attention, "_forced_kernel", None)


def raises(*args, **kwargs):
    raise RuntimeError("kernel launch failed (made to fail by the test)")


def loss_one_percent_high(hidden, weight, labels):
    return lm_loss(hidden, weight, labels, "chunked") * 1.01


def gradient_five_percent_high(hidden, weight, labels):
    """The right loss; the gradient of the hidden states 5% high."""
    return lm_loss(hidden + 0.05 * (hidden - hidden.detach()), weight, labels, "chunked")


def attention_one_percent_high(q, segments, pattern, first_position, layout):
    return attention._blocks(q, segments, pattern, first_position, layout) * 1.01


def attention_exact(q, segments, pattern, first_position, layout):
    return attention._blocks(q, segments, pattern, first_position, layout)


def check(mode, loss_kernel="chunked", attention_kernel=None):
    lines = []
    result = check_kernels(
        loss_kernel,
        attention_kernel,
        CPU,
        torch.float32,
        mode,
        d_model=32,
        vocab_size=300,
        patterns=PATTERNS,
        head_dim=16,
        say=lines.append,
    )
    return result, lines


BROKEN_LOSSES = {
    "raises": (raises, "raised RuntimeError: kernel launch failed"),
    "loss 1% high": (loss_one_percent_high, "loss 0.01"),
    "gradient 5% high": (gradient_five_percent_high, "gradients 0.05"),
}


@pytest.mark.parametrize("broken", list(BROKEN_LOSSES))
def test_a_broken_loss_kernel_falls_back_to_chunked(monkeypatch, broken):
    kernel, said = BROKEN_LOSSES[broken]
    monkeypatch.setitem(loss_module.FUSED_LOSSES, "liger", kernel)
    (loss_kernel, attention_kernel, record), lines = check("fallback", "liger")
    assert (loss_kernel, attention_kernel) == ("chunked", None)
    assert len(lines) == 1 and "loss kernel liger on cpu (float32) FAILED against chunked" in lines[0], lines
    assert said in lines[0] and lines[0].endswith("using chunked instead"), lines[0]
    entry = record["loss"]
    assert entry["kernel"] == "liger" and entry["used"] == "chunked" and entry["check"]["passed"] is False
    assert record["attention"] == {"kernel": None, "used": None, "check": None}


@pytest.mark.parametrize("broken", list(BROKEN_LOSSES))
def test_a_broken_loss_kernel_stops_a_strict_run(monkeypatch, broken):
    kernel, said = BROKEN_LOSSES[broken]
    monkeypatch.setitem(loss_module.FUSED_LOSSES, "cce", kernel)
    with pytest.raises(
        KernelError, match="loss kernel cce .* FAILED against chunked.*train.kernel_check: strict"
    ) as error:
        check("strict", "cce")
    assert said in str(error.value) and "\n" not in str(error.value)


BROKEN_ATTENTION = {
    "raises": (raises, "raised RuntimeError: kernel launch failed"),
    "output 1% high": (attention_one_percent_high, "attention 0.01"),
}


@pytest.mark.parametrize("broken", list(BROKEN_ATTENTION))
def test_a_broken_attention_kernel_falls_back_to_blocks(monkeypatch, broken):
    """FlexAttention replaced by a broken stand-in (no compile): caught on the forward, which is
    what the CPU checks; after the fallback every device trains on blocks."""
    kernel, said = BROKEN_ATTENTION[broken]
    monkeypatch.setattr(attention, "_flex", kernel)
    (loss_kernel, attention_kernel, record), lines = check("fallback", attention_kernel="flex")
    assert (loss_kernel, attention_kernel) == ("chunked", "blocks")
    assert kernel_for(torch.device("cuda", 0)) == "blocks" and kernel_for(CPU) == "blocks"
    assert len(lines) == 1 and "attention kernel flex on cpu (float32) FAILED against blocks" in lines[0]
    assert said in lines[0] and lines[0].endswith("using blocks instead"), lines[0]
    assert record["attention"]["used"] == "blocks" and record["attention"]["check"]["passed"] is False


@pytest.mark.parametrize("broken", list(BROKEN_ATTENTION))
def test_a_broken_attention_kernel_stops_a_strict_run(monkeypatch, broken):
    kernel, said = BROKEN_ATTENTION[broken]
    monkeypatch.setattr(attention, "_flex", kernel)
    with pytest.raises(KernelError, match="attention kernel flex .* FAILED against blocks") as error:
        check("strict", attention_kernel="flex")
    assert said in str(error.value)
    assert kernel_for(torch.device("cuda", 0)) == "flex"  # nothing was switched


def test_a_right_kernel_passes_and_the_cpu_checks_attention_forward_only(monkeypatch):
    monkeypatch.setattr(attention, "_flex", attention_exact)
    (_, attention_kernel, record), lines = check("fallback", attention_kernel="flex")
    assert attention_kernel == "flex" and kernel_for(torch.device("cuda", 0)) == "flex"
    entry = record["attention"]["check"]
    assert entry["passed"] and entry["backward"] is False and entry["differences"] == {"attention": 0.0}
    assert "matches blocks" in lines[0] and "FlexAttention has no backward on the CPU" in lines[0], lines[0]


def test_off_checks_nothing_and_a_failing_check_on_another_rank_fails_here_too(monkeypatch):
    monkeypatch.setitem(loss_module.FUSED_LOSSES, "liger", raises)
    (loss_kernel, _, record), lines = check("off", "liger")
    assert loss_kernel == "liger" and record["loss"]["check"] is None and not lines
    monkeypatch.setitem(loss_module.FUSED_LOSSES, "liger", lambda h, w, y: lm_loss(h, w, y, "chunked"))
    lines = []
    loss_kernel, _, record = check_kernels(
        "liger",
        None,
        CPU,
        torch.float32,
        "fallback",
        d_model=32,
        vocab_size=300,
        agree=lambda failed: True,
        say=lines.append,
    )
    assert loss_kernel == "chunked" and "failed on another rank" in lines[0]


def test_the_model_says_which_patterns_it_attends_with():
    assert attention_patterns(tiny_model("vanilla")) == []
    assert attention_patterns(tiny_model("bottom_up")) == [SlidingWindow(8)]
    assert attention_patterns(tiny_model("retina")) == [RetinaPattern(8, 2, 3)]


@pytest.mark.usefixtures("cpu_kernels")
def test_the_real_liger_kernel_passes_its_check_under_the_interpreter():
    if not installed("liger"):
        pytest.skip("liger-kernel is not installed (pip install -e '.[dev]')")
    (loss_kernel, _, record), lines = check("strict", "liger")
    entry = record["loss"]["check"]
    assert loss_kernel == "liger" and entry["passed"] and entry["backward"], lines
    assert entry["differences"]["loss"] <= TOLERANCES[torch.float32]["loss"]


@pytest.mark.slow
def test_the_real_flex_attention_forward_passes_its_check_on_the_cpu():
    """FlexAttention compiled by inductor for the CPU, forward only."""
    (_, attention_kernel, record), lines = check("strict", attention_kernel="flex")
    entry = record["attention"]["check"]
    assert attention_kernel == "flex" and entry["passed"] and not entry["backward"], lines


# ----------------------------------------------------------------------------------------------
# Through `msllm train`
# ----------------------------------------------------------------------------------------------

LIGER_ONE_PERCENT_HIGH = """
import msllm.train.loss as _loss
_liger = _loss.FUSED_LOSSES["liger"]
_loss.FUSED_LOSSES["liger"] = lambda h, w, y: _liger(h, w, y) * 1.01
"""


@pytest.mark.slow
@pytest.mark.parametrize("made_wrong", [False, True], ids=["liger", "liger-1%-high"])
def test_msllm_train_checks_liger_on_the_cpu_and_records_it(tmp_path, tiny_data, made_wrong):
    """3 steps of the tiny recipe (train.loss_kernel: liger, under Triton's interpreter): the check
    passes and liger trains; made 1% high, the run trains on chunked and says so. run.json keeps the
    check either way."""
    if not installed("liger"):
        pytest.skip("liger-kernel is not installed (pip install -e '.[dev]')")
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        train={"max_steps": 3, "loss_kernel": "liger"},
        eval={"every": 0, "max_batches": 1},
        checkpoint={"every": 0},
    )
    env = clean_env(MSLLM_ALLOW_CPU_KERNELS="1", TRITON_INTERPRET="1")
    done = msllm("train", recipe, env=env, python_code=LIGER_ONE_PERCENT_HIGH if made_wrong else None)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads((out / "run.json").read_text())["kernels"]
    assert kernels["mode"] == "fallback" and kernels["attention"]["check"] is None  # vanilla: full attention
    loss = kernels["loss"]
    assert loss["kernel"] == "liger" and loss["check"]["backward"]
    if made_wrong:
        assert loss["used"] == "chunked" and not loss["check"]["passed"]
        assert "kernel check: loss kernel liger on cpu (float32) FAILED against chunked" in done.stdout
        assert "| loss chunked |" in done.stdout
    else:
        assert loss["used"] == "liger" and loss["check"]["passed"]
        assert "kernel check: loss kernel liger on cpu (float32) matches chunked" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "train"] == [1, 2, 3]
