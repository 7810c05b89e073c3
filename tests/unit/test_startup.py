"""Commands that need neither DeepSpeed nor an MFU peak do not pay for them (issue 21, item 2):
eval, generate, export, inspect, and a train of a finished run. (Their times are measured by
`msllm bench startup`, not asserted here.)"""

from __future__ import annotations

import json

import pytest

from fixtures.train import check, make_recipe, msllm

# At exit, print which heavy modules the command imported.
_REPORT_IMPORTS = """
import atexit, json, sys
atexit.register(
    lambda: print("IMPORTED " + json.dumps({m: m in sys.modules for m in ("deepspeed", "transformers", "torchvision")}))
)
"""


def imported(proc) -> dict:
    check(proc)
    return json.loads(
        next(line for line in proc.stdout.splitlines() if line.startswith("IMPORTED "))[len("IMPORTED ") :]
    )


@pytest.mark.slow
def test_commands_over_a_trained_model_import_neither_deepspeed_nor_transformers(tmp_path, reference_run):
    recipe, out, _ = reference_run
    for args in (
        ("eval", recipe, "--checkpoint", out),
        ("generate", out, "--prompt", "The", "--max-new-tokens", "2"),
        ("export", out, "--out", tmp_path / "export"),
        ("inspect", recipe),
    ):
        modules = imported(msllm(*args, python_code=_REPORT_IMPORTS))
        assert modules == {"deepspeed": False, "transformers": False, "torchvision": False}, args


def test_a_finished_training_says_so_without_deepspeed_or_a_peak(tmp_path, tiny_data, reference_run):
    _, ref_out, _ = reference_run
    recipe, out = make_recipe(tmp_path, tiny_data)
    import shutil

    shutil.copytree(ref_out, out)
    proc = msllm("train", recipe, python_code=_REPORT_IMPORTS)
    assert imported(proc)["deepspeed"] is False
    assert "nothing to do: the latest checkpoint" in proc.stdout and "step_0000012 is at step 12" in proc.stdout
    assert "peak for MFU" not in proc.stdout and not (out / "checkpoints" / "step_0000013").exists()


def test_streaming_imports_without_transformers_and_its_unused_parts_load_on_use():
    import subprocess
    import sys

    code = (
        "import sys, msllm.data.loader\n"
        "assert 'transformers' not in sys.modules and 'torchvision' not in sys.modules\n"
        "from streaming.text import StreamingC4\n"  # the deferred subpackage loads, whole
        "from transformers.tokenization_utils_base import BatchEncoding\n"  # the real one
        "assert BatchEncoding.__module__ == 'transformers.tokenization_utils_base'"
        " and hasattr(BatchEncoding, 'char_to_token')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
