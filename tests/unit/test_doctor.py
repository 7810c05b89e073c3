"""`msllm doctor`: it runs, --json is JSON with every part, and the kernels part runs the start-up
check of a non-reference kernel (on the CPU every kernel training uses is a reference, so the
tests put stand-ins in: FlexAttention computed by the blocks kernel, a loss kernel that raises)."""

from __future__ import annotations

import json

import pytest
import torch

import msllm.models.attention.kernels as attention
import msllm.train.loss as loss_module
from fixtures.train import msllm
from msllm.doctor import format_report, kernels

PARTS = {"versions", "devices", "distributed", "kernels", "matmul", "disk", "seconds"}


def test_doctor_json_has_every_part(tmp_path):
    done = msllm("doctor", "--json", "--output-dir", tmp_path / "not-yet", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # nothing but the JSON on stdout
    assert PARTS <= set(report)
    assert report["versions"]["torch"] == torch.__version__.split("+")[0]
    assert {
        "python",
        "deepspeed",
        "triton",
        "mosaicml-streaming",
        "streaming-community",
        "liger-kernel",
        "cut-cross-entropy",
    } <= set(report["versions"])
    assert report["devices"][0]["device"] == "cpu" and report["devices"][0]["cores"] >= 1
    assert report["distributed"]["backends"]["gloo"] is True
    assert isinstance(report["distributed"]["deepspeed_ops"]["compatible"], dict)
    cpu = report["kernels"][0]
    assert cpu["device"] == "cpu" and cpu["attention"]["kernel"] == "blocks" and cpu["loss"]["kernel"] == "chunked"
    assert report["matmul"][0]["flops"] > 0 and report["matmul"][0]["fraction_of_peak"] <= 1
    output = report["disk"][0]
    assert output["what"] == "output" and output["exists"] is False and output["free_bytes"] > 0


@pytest.mark.slow
def test_doctor_text_runs():
    done = msllm("doctor", "--no-check", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for title in ("versions:", "devices:", "distributed:", "kernels", "matmul:", "disk:"):
        assert title in done.stdout, done.stdout


def test_doctor_checks_the_non_reference_kernels_a_device_would_use(monkeypatch):
    monkeypatch.setattr(attention, "_forced_kernel", "flex")  # as on CUDA
    monkeypatch.setattr(
        attention,
        "_flex",
        lambda q, segments, pattern, first, layout: attention._blocks(q, segments, pattern, first, layout),
    )
    monkeypatch.setattr("msllm.doctor.choose_kernel", lambda requested, device_type: "liger")

    def raises(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(loss_module.FUSED_LOSSES, "liger", raises)
    [row] = kernels(["cpu"])
    assert row["attention"]["kernel"] == "flex" and row["attention"]["check"]["passed"] is True
    assert row["attention"]["check"]["backward"] is False  # FlexAttention has no CPU backward
    assert row["loss"]["kernel"] == "liger" and row["loss"]["check"]["passed"] is False
    text = format_report(
        {
            "versions": {},
            "devices": [],
            "distributed": {"error": "x"},
            "kernels": [row],
            "matmul": [],
            "disk": [],
            "seconds": 0,
        }
    )
    assert "cpu attention: flex (float32): PASSES its check against blocks" in text
    assert "cpu loss: liger (float32): FAILS its check against chunked: raised RuntimeError: no kernel image" in text
