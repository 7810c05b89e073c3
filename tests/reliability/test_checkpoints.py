"""Issue 12, items 2, 5, 7 and 12: checkpoints are verified and fallen back from, never written
with NaN weights, and a failed write (a really full disk, a file size limit) is one line with the
previous checkpoint kept."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from fixtures.reliability import checkpoints, cli, flip_bytes, one_line, one_line_error, tree_digest
from fixtures.train import check, losses, make_recipe, msllm, rows


def _resume_falls_back(recipe, out, trained_run, broken: str):
    proc = check(msllm("train", recipe))
    notes = [line for line in proc.stdout.splitlines() if "is unusable" in line]
    assert len(notes) == 1 and "step_0000006" in notes[0] and "set aside as step_0000006.corrupt" in notes[0]
    assert "resumed from" in proc.stdout and "step_0000003 at step 3" in proc.stdout
    assert losses(out) == losses(trained_run[1])  # steps 4-6 retrained exactly
    kept = out / "checkpoints" / "step_0000006.corrupt" / broken
    return notes[0], kept


def test_flipped_bytes_in_latest_fall_back_to_the_previous(run_copy, trained_run):
    recipe, out = run_copy
    target = out / "checkpoints" / "step_0000006" / "mp_rank_00_model_states.pt"
    flip_bytes(target)
    corrupt = target.read_bytes()
    note, kept = _resume_falls_back(recipe, out, trained_run, "mp_rank_00_model_states.pt")
    assert "mp_rank_00_model_states.pt fails its checksum" in note
    assert kept.read_bytes() == corrupt  # set aside, never deleted
    assert (out / "checkpoints" / "step_0000006" / "COMPLETE").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"", b"garbage" * 1000])
def test_empty_or_garbage_model_states_fall_back(run_copy, trained_run, content):
    recipe, out = run_copy
    (out / "checkpoints" / "step_0000006" / "mp_rank_00_model_states.pt").write_bytes(content)
    note, kept = _resume_falls_back(recipe, out, trained_run, "mp_rank_00_model_states.pt")
    assert kept.read_bytes() == content


def test_missing_trainer_state_falls_back(run_copy, trained_run):
    recipe, out = run_copy
    (out / "checkpoints" / "step_0000006" / "trainer_state_rank0.pt").unlink()
    note, _ = _resume_falls_back(recipe, out, trained_run, "meta.json")
    assert "trainer_state_rank0.pt" in note and "fewer ranks" not in note


def test_garbage_without_recorded_checksums_is_unreadable_and_falls_back(run_copy, trained_run):
    """Checkpoints written before checksums were recorded: a load failure also falls back."""
    recipe, out = run_copy
    ckpt = out / "checkpoints" / "step_0000006"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "COMPLETE").write_text("step 6\n")  # as such checkpoints wrote it: no checksum of meta.json
    (ckpt / "trainer_state_rank0.pt").write_bytes(b"\x00" * 100)
    note, _ = _resume_falls_back(recipe, out, trained_run, "trainer_state_rank0.pt")
    assert "not a readable torch checkpoint file" in note


def test_a_load_that_fails_half_way_restarts_from_the_initial_weights(run_copy, trained_run):
    """Probe class: a failed load (issue 32 item 3). DeepSpeed loads a checkpoint's weights before
    its optimizer state; when the optimizer state then fails to load, in every checkpoint, the
    run starts again from step 0: from the initial weights, not from the last checkpoint's weights.
    Its step-1 loss is the fresh run's, exactly."""
    from fixtures.reliability import rerecord_checksum

    recipe, out = run_copy
    for step in (3, 6):
        path = out / "checkpoints" / f"step_{step:07d}" / "mp_rank_00_model_states.pt"
        states = torch.load(path, weights_only=True)
        states["optimizer"]["param_groups"] = states["optimizer"]["param_groups"][:1]  # loads the weights, then fails
        torch.save(states, path)
        rerecord_checksum(path)  # as one who rewrites the whole folder would: not caught by the checksums
    proc = check(msllm("train", recipe, "--set", "train.max_steps=7"))
    assert "all 2 checkpoints" in proc.stdout and "starts again from step 0 from the initial weights" in proc.stdout
    fresh = rows(trained_run[1])[0]
    restarted = [r for r in rows(out) if r["step"] == 1][-1]
    assert restarted["loss"] == fresh["loss"] and restarted["grad_norm"] == fresh["grad_norm"]


@pytest.mark.parametrize("command", ["eval", "export", "generate"])
def test_corrupt_latest_named_by_eval_export_generate(run_copy, tmp_path, capsys, command):
    recipe, out = run_copy
    flip_bytes(out / "checkpoints" / "step_0000006" / "mp_rank_00_model_states.pt")
    before = tree_digest(out)
    args = {
        "eval": ("eval", recipe, "--checkpoint", out),
        "export": ("export", out, "--out", tmp_path / "export"),
        "generate": ("generate", out, "--prompt", "The", "--max-new-tokens", "1"),
    }[command]
    code, _, err = cli(capsys, *args)
    line = one_line(code, err, command)
    assert "step_0000006 is corrupt (mp_rank_00_model_states.pt fails its checksum)" in line
    assert "use an older one, e.g." in line and "step_0000003" in line
    assert tree_digest(out) == before  # read-only commands rename nothing


def test_pruning_never_deletes_the_last_verified_checkpoint(tmp_path):
    from msllm.checkpoint.checkpointer import Checkpointer
    from msllm.config import CheckpointConfig
    from msllm.distributed import ParallelDims

    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep_last=1), state=None, dims=ParallelDims(1, 0, 1))
    for step in (1, 2, 3):
        folder = checkpointer.root / f"step_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text("{}")
        (folder / "COMPLETE").write_text("")
    checkpointer.last_verified = checkpointer.root / "step_0000001"
    checkpointer.prune()
    assert checkpoints(tmp_path) == ["step_0000001", "step_0000003"]


@pytest.mark.slow
def test_nan_update_never_applied_nor_saved(tmp_path, tiny_data):
    """lr=1e6: the first updates blow the weights up and the gradients turn NaN; those updates are
    skipped, no checkpoint is saved during the streak, the checkpoints holding the blown-up weights
    are set aside, the run stops with one line; a rerun with a sane lr trains to a finite loss."""
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        train={"max_steps": 12, "lr": 1.0e6, "max_skipped_steps": 3},
        checkpoint={"every": 2, "keep_last": 0},
        eval={"every": 0, "max_batches": 2},
    )
    line = one_line_error(msllm("train", recipe), "train")
    assert "training diverged: 3 updates in a row" in line and "NaN or inf gradients and were skipped" in line
    assert "no checkpoint before that is left: rerun with a lower train.lr" in line
    aside = sorted(p for p in (out / "checkpoints").iterdir() if p.name.endswith(".diverged"))
    assert aside and checkpoints(out) == [p.name for p in aside]  # kept, renamed, none deleted
    for folder in aside:
        weights = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert all(torch.isfinite(w).all() for w in weights.values()), folder
    check(msllm("train", recipe, "--set", "train.lr=3e-3"))
    evals = rows(out, "eval")
    assert len(evals) == 1 and evals[0]["step"] == 12 and evals[0]["loss"] < 10


_NAN_FROM_STEP_5 = """
import msllm.train.trainer as trainer_module
_train_step = trainer_module.Trainer.train_step
def train_step(self, batches, plan):
    engine = self.state.engine
    if self.state.step >= 4 and not getattr(engine, "_nan_hook", None):
        engine._nan_hook = [p.register_hook(lambda g: g * float("nan")) for p in engine.module.parameters()]
    return _train_step(self, batches, plan)
trainer_module.Trainer.train_step = train_step
"""


@pytest.mark.slow
def test_divergence_names_the_last_good_checkpoint_and_rerun_resumes_it(tmp_path, tiny_data, reference_run):
    """NaN gradients from step 5 on: step_0000004 holds the weights that gave them and is set
    aside; step_0000002 is named; the rerun resumes it and matches an uninterrupted run exactly."""
    _, ref_out, _ = reference_run
    recipe, out = make_recipe(
        tmp_path, tiny_data, train={"max_skipped_steps": 2}, checkpoint={"every": 2, "keep_last": 0}
    )
    line = one_line_error(msllm("train", recipe, python_code=_NAN_FROM_STEP_5), "train")
    assert "2 updates in a row (steps 5-6)" in line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_0000002'}" in line
    assert checkpoints(out) == ["step_0000002", "step_0000004.diverged"]
    proc = check(msllm("train", recipe))
    assert "step_0000002 at step 2" in proc.stdout
    assert losses(out) == losses(ref_out)


_POISON_AT_STEP_6 = """
from msllm.checkpoint.checkpointer import Checkpointer
_save = Checkpointer.save
def save(self, step):
    if step == 6:
        next(self.state.engine.module.parameters()).data.fill_(float("nan"))
    return _save(self, step)
Checkpointer.save = save
"""


def test_checkpoint_with_nan_weights_is_never_written(tmp_path, tiny_data):
    recipe, out = make_recipe(
        tmp_path, tiny_data, train={"max_steps": 6}, checkpoint={"every": 3}, eval={"every": 0, "max_batches": 1}
    )
    line = one_line_error(msllm("train", recipe, python_code=_POISON_AT_STEP_6), "train")
    assert "not saving checkpoint step_0000006: the weights hold NaN or inf values" in line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_0000003'}" in line
    assert checkpoints(out) == ["step_0000003"]


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)


@pytest.mark.needs_root("mounts a 3.5 MiB tmpfs")
def test_really_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_data):
    """The run folder on a 3.5 MiB tmpfs: step 3 fits, step 6 does not."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "3500k")
    try:
        recipe, _ = make_recipe(
            tmp_path,
            tiny_data,
            train={"max_steps": 6},
            checkpoint={"every": 3},
            eval={"every": 0, "max_batches": 1},
            log={"every": 1, "tensorboard": False},
        )
        out = disk / "run"
        proc = msllm("train", recipe, "--set", f"run.output_dir={out}")
        line = one_line_error(proc, "train")
        assert "could not save checkpoint" in line and "step_0000006: no space left on device" in line
        assert f"the last good checkpoint is {out / 'checkpoints' / 'step_0000003'}" in line
        assert checkpoints(out) == ["step_0000003"]
        assert (out / "checkpoints" / "step_0000003" / "COMPLETE").is_file()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_write_error_inside_torch_save_is_one_line(tmp_path, tiny_data):
    """A 1 MiB file size limit: torch.save's writer fails mid-file (a RuntimeError, not an OSError)."""
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        train={"max_steps": 3},
        checkpoint={"every": 3},
        eval={"every": 0, "max_batches": 1},
        log={"every": 1, "tensorboard": False},
    )
    proc = msllm("train", recipe, preexec_fn=_file_size_limit)
    line = one_line_error(proc, "train")
    assert "could not save checkpoint" in line and "step_0000003" in line and "there is no earlier checkpoint" in line
    assert checkpoints(out) == []  # the partial folder is gone


@pytest.mark.slow
def test_generate_from_a_zero_checkpoint_prints_only_the_text(zero1_run, capsys):
    """Probe class: a command whose stdout is its product (`msllm generate` from a ZeRO-1
    checkpoint, read through DeepSpeed's zero_to_fp32). DeepSpeed's first import logged "Setting
    accelerator to CPU" on stdout, ahead of the text; now stdout is exactly the generated text
    (DeepSpeed's line goes to stderr)."""
    from msllm.use.generate import generate_cli

    _, out = zero1_run
    args = ("--prompt", "The", "--prompt", "A cat", "--temperature", "0", "--max-new-tokens", "6")
    proc = check(msllm("generate", out, *args))
    texts = generate_cli(str(out), ["The", "A cat"], max_new_tokens=6, temperature=0)  # greedy: the same texts
    capsys.readouterr()
    assert texts[0].startswith("The") and texts[1].startswith("A cat")
    assert proc.stdout == "\n\n".join(texts) + "\n", proc.stdout
