"""Issue 12, item 1: loading a checkpoint never runs code from it.

A tampered `mp_rank_00_model_states.pt` or `trainer_state_rank0.pt` whose pickle calls os.system is
refused with one line by every command that loads checkpoints, and the command never runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fixtures.reliability import Malicious, checkpoints, one_line_error, plant_malicious, tree_digest
from fixtures.train import check, clean_env, msllm


@pytest.mark.slow
def test_the_planted_file_really_runs_code_under_an_unsafe_load(tmp_path):
    """The fixture is live: torch.load(weights_only=False), what msllm did before, runs it."""
    import torch

    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"module": Malicious(marker)}, path)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], env=clean_env(), check=True, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("command", ["export", "generate", "eval"])
def test_malicious_model_states_refused(run_copy, tmp_path, command):
    recipe, out = run_copy
    marker = tmp_path / "ran"
    plant_malicious(out / "checkpoints" / "step_0000006" / "mp_rank_00_model_states.pt", marker)
    before = tree_digest(out)
    args = {
        "export": ("export", out, "--out", tmp_path / "export"),
        "generate": ("generate", out, "--prompt", "The cat", "--max-new-tokens", "2"),
        "eval": ("eval", recipe, "--checkpoint", out),
    }[command]
    line = one_line_error(msllm(*args), command)
    assert "refused to load" in line and "mp_rank_00_model_states.pt" in line and "posix.system" in line
    assert not marker.exists()
    assert tree_digest(out) == before
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "trainer_state_rank0.pt"])
def test_malicious_file_refused_on_resume(run_copy, tmp_path, name):
    recipe, out = run_copy
    marker = tmp_path / "ran"
    plant_malicious(out / "checkpoints" / "step_0000006" / name, marker)
    before = tree_digest(out / "checkpoints")
    line = one_line_error(msllm("train", recipe, "--set", "train.max_steps=8"), "train")
    assert "refused to load" in line and name in line and "posix.system" in line
    assert not marker.exists()
    assert tree_digest(out / "checkpoints") == before  # the evidence is kept, nothing is pruned
    assert checkpoints(out) == ["step_0000003", "step_0000006"]


@pytest.mark.slow
def test_user_cannot_switch_safe_loading_off_by_environment(run_copy, tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment does not reopen the hole."""
    _, out = run_copy
    marker = tmp_path / "ran"
    plant_malicious(out / "checkpoints" / "step_0000006" / "mp_rank_00_model_states.pt", marker)
    proc = msllm("export", out, "--out", tmp_path / "export", env=clean_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    assert "refused to load" in one_line_error(proc, "export")
    assert not marker.exists()


@pytest.mark.slow
def test_zero3_checkpoint_resumes_and_exports_weights_only(tmp_path, tiny_data):
    """DeepSpeed's own ZeRO files (loss scaler, ZeRO stage, fragment addresses) load weights-only:
    a ZeRO-3 run resumes and exports."""
    from fixtures.train import make_recipe

    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        parallel={"zero_stage": 3},
        train={"max_steps": 3, "stop_at_step": 2},
        eval={"every": 0, "max_batches": 1},
        checkpoint={"every": 0},
    )
    check(msllm("train", recipe))
    proc = check(msllm("train", recipe, "--set", "train.stop_at_step=0"))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    check(msllm("export", out, "--out", tmp_path / "export"))
    assert (tmp_path / "export" / "model.safetensors").is_file()
