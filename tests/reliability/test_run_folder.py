"""Issue 12, items 3, 4, 11 and 12: one training per run folder, never two runs mixed in one,
and a folder that cannot be used is one line."""

from __future__ import annotations

import subprocess

import pytest

from fixtures.reliability import checkpoints, one_line_error, tree_digest
from fixtures.train import check, make_recipe, msllm, rows, start_msllm, wait_for_line
from msllm.checkpoint.files import latest_complete, step_of


@pytest.mark.slow
def test_second_training_refused_and_lock_stale_after_kill_9(tmp_path, tiny_data):
    recipe, out = make_recipe(
        tmp_path, tiny_data, train={"max_steps": 100000}, checkpoint={"every": 2}, eval={"every": 0, "max_batches": 1}
    )
    first = start_msllm("train", recipe)
    try:
        wait_for_line(first, " 3/100000 |")  # step 2's checkpoint is complete: it is saved before step 3 runs
        line = one_line_error(msllm("train", recipe), "train")
        assert f"is in use by another training (pid {first.pid} on " in line and "use another run.output_dir" in line
        assert first.poll() is None  # the first one is untouched and still training
    finally:
        first.kill()  # kill -9, wherever it is (a save included): the kernel drops its lock
        first.communicate()
    # What the resume must start from: the newest checkpoint with its COMPLETE marker (a folder the
    # kill left half written is not one), as msllm.checkpoint decides it.
    saved = latest_complete(out / "checkpoints")
    assert saved is not None and step_of(saved) >= 2
    proc = check(msllm("train", recipe, "--set", f"train.max_steps={step_of(saved) + 1}"))
    assert f"resumed from {saved} at step {step_of(saved)}" in proc.stdout
    # metrics.jsonl reads as one run: each step once, the rows the killed run logged after its
    # last complete checkpoint dropped.
    assert [r["step"] for r in rows(out)] == list(range(1, step_of(saved) + 2))


@pytest.mark.slow
def test_fresh_start_into_a_finished_run_refused(run_copy):
    recipe, out = run_copy
    before = tree_digest(out)
    line = one_line_error(msllm("train", recipe, "--set", "checkpoint.resume=false"), "train")
    assert "already holds a run and checkpoint.resume is false" in line and "--overwrite" in line
    assert tree_digest(out) == before


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside(run_copy, trained_run):
    recipe, out = run_copy
    before = tree_digest(out)
    proc = check(
        msllm("train", recipe, "--overwrite", "--set", "checkpoint.resume=false", "--set", "train.max_steps=2")
    )
    (aside,) = [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".replaced-")]
    assert f"moved the previous run in {out} aside to {aside}" in proc.stdout
    assert tree_digest(aside) == before
    assert [r["step"] for r in rows(out)] == [1, 2] and checkpoints(out) == ["step_0000002"]


def test_rerun_of_a_finished_run_adds_no_eval_row(run_copy):
    recipe, out = run_copy
    before = tree_digest(out / "checkpoints")
    metrics = (out / "metrics.jsonl").read_text()
    proc = check(msllm("train", recipe))
    assert "nothing to do" in proc.stdout
    assert (out / "metrics.jsonl").read_text() == metrics
    assert tree_digest(out / "checkpoints") == before


@pytest.mark.slow
def test_output_dir_that_is_a_file(tmp_path, tiny_data):
    recipe, _ = make_recipe(tmp_path, tiny_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    line = one_line_error(msllm("train", recipe, "--set", f"run.output_dir={blocker}"), "train")
    assert f"run.output_dir {blocker} is a file, not a folder" in line
    assert blocker.read_text() == "keep me\n"


def _tmpfs(where, options):
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)


@pytest.mark.slow
@pytest.mark.needs_root("mounts a tmpfs")
@pytest.mark.parametrize("case", ["read-only", "full"])
def test_unusable_output_disk_at_start(tmp_path, tiny_data, case):
    """A read-only file system (a real ro mount: root ignores permission bits) or a full one."""
    recipe, _ = make_recipe(tmp_path, tiny_data)
    disk = tmp_path / "disk"
    _tmpfs(disk, "size=64k")
    try:
        if case == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        else:
            (disk / "run").mkdir()
            try:
                with open(disk / "filler", "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            except OSError:  # full: what the test wants
                pass
        line = one_line_error(msllm("train", recipe, "--set", f"run.output_dir={disk / 'run'}"), "train")
        expected = "Read-only file system" if case == "read-only" else "No space left on device"
        assert f"run.output_dir {disk / 'run'}" in line and expected in line
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
@pytest.mark.needs_root("mounts a read-only tmpfs")
def test_read_only_shards_dir_to_prepare(tmp_path, tiny_data):
    disk = tmp_path / "ro"
    _tmpfs(disk, "size=64k,ro")
    try:
        recipe, out = make_recipe(tmp_path, tiny_data)
        line = one_line_error(msllm("train", recipe, "--set", f"data.shards_dir={disk / 'shards'}"), "train")
        assert "Read-only file system" in line
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_overwrite_of_a_finished_run_moves_it_aside_and_starts(run_copy):
    """Probe class: `msllm train --overwrite` on a finished run (checkpoint.resume true): it starts
    afresh, as its help says, instead of "nothing to do"."""
    recipe, out = run_copy
    before = tree_digest(out)
    proc = check(msllm("train", recipe, "--overwrite", "--set", "train.max_steps=2"))
    assert "nothing to do" not in proc.stdout
    (aside,) = [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".replaced-")]
    assert f"moved the previous run in {out} aside to {aside}" in proc.stdout
    assert tree_digest(aside) == before
    assert [r["step"] for r in rows(out)] == [1, 2] and checkpoints(out) == ["step_0000002"]


# Before step 5 the training waits (up to 120 s) until its run folder is gone: the test deletes it then.
_WAIT_FOR_THE_FOLDER_TO_GO = """
import os, time
import msllm.train.schedule as _schedule
_plan_of_step = _schedule.Schedule.at
def _wait_then_plan(self, step):
    if step == 5:
        print("WAITING FOR THE RUN FOLDER TO GO", flush=True)
        deadline = time.monotonic() + 120
        while os.path.exists(os.environ["MSLLM_TEST_RUN"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    return _plan_of_step(self, step)
_schedule.Schedule.at = _wait_then_plan
"""


@pytest.mark.slow
def test_run_folder_deleted_during_training_stops_with_one_line(tmp_path, tiny_data):
    """Probe class: run.output_dir deleted (rm -rf) while the run trains: its lock went with it."""
    import shutil

    from fixtures.launch import clean_env

    recipe, out = make_recipe(
        tmp_path, tiny_data, train={"max_steps": 8}, checkpoint={"every": 2}, eval={"every": 0, "max_batches": 1}
    )
    proc = start_msllm("train", recipe, python_code=_WAIT_FOR_THE_FOLDER_TO_GO, env=clean_env(MSLLM_TEST_RUN=str(out)))
    try:
        wait_for_line(proc, "WAITING FOR THE RUN FOLDER TO GO")  # steps 2 and 4 saved
        shutil.rmtree(out)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "train")
    assert f"run.output_dir {out} was deleted or moved while this run trained (its .lock is gone)" in line
    assert "put the folder back and rerun the same command to resume" in line
    assert not out.exists()  # the step-6 checkpoint was not written into a new folder


# metrics.jsonl's descriptor is moved onto /dev/full before its 5th row: the kernel's own ENOSPC,
# through the real line-buffered file (whose close flushes the failed line again), at a known step.
METRICS_FILL_UP = """
import os
import msllm.train.callbacks as _callbacks
_open = _callbacks.open_append_nofollow
def _open_filling_up(path):
    f = _open(path)
    write, rows = f.write, []
    def write_until_full(text):
        rows.append(text)
        if len(rows) == 5:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())
            os.close(full)
        return write(text)
    f.write = write_until_full
    return f
_callbacks.open_append_nofollow = _open_filling_up
"""


@pytest.mark.slow
def test_no_space_for_metrics_names_the_file_and_a_rerun_resumes(tmp_path, tiny_data):
    """Probe class: no space left for metrics.jsonl mid-run (ENOSPC from /dev/full at step 5). Its
    OSError named no file; now the line names metrics.jsonl, says to free space, and that a rerun
    resumes from the last checkpoint (step 3): the rerun gives steps 1-6 once each."""
    recipe, out = make_recipe(
        tmp_path, tiny_data, train={"max_steps": 6}, eval={"every": 0, "max_batches": 1}, checkpoint={"every": 3}
    )
    proc = msllm("train", recipe, python_code=METRICS_FILL_UP)
    line = one_line_error(proc, "train")
    metrics = out / "metrics.jsonl"
    assert f"cannot write {metrics}: No space left on device: free space in {out}" in line, line
    assert "then rerun: it resumes from the last checkpoint" in line, line
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert checkpoints(out) == ["step_0000003"]
    check(msllm("train", recipe))
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
