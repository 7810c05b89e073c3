"""Elastic resume: a checkpoint saved on one layout (ranks, dp x sp, ZeRO stage) continues on
another with the same data and, within 1e-5 relative, the same losses.

Three uninterrupted 4-rank runs are the references (ZeRO 1, ZeRO 3, dp 2 x sp 2); each is
resumed from its step-3 checkpoint on fewer ranks, with the accumulation that keeps the global
batch, and on another ZeRO stage. At every later step the global sample ids (log.sample_ids)
equal the reference's and the losses agree within 1e-5 relative (the summation order differs).
A ZeRO-0 checkpoint is made by one of the resumed runs (1 rank) and grows back to 2 ranks.
Every ZeRO stage is loaded from and into. The conversion itself (once, beside the original,
never touching it, atomic) is tested in one process on the ZeRO-1 reference's checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fixtures.launch import torchrun
from fixtures.train import check, error_lines, make_recipe, msllm, msllm_torchrun, recipe_paths, rows

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, SAVED = 6, 3
MODEL = {"arch": "vanilla", "scales": [{"factor": 1, "layers": 2, "attention": "full"}]}
REFERENCES = {  # name: (ranks, parallel section, micro-batch): global batch 4 in each
    "z1": (4, {"zero_stage": 1}, 1),
    "z3": (4, {"zero_stage": 3}, 1),
    "dp2sp2": (4, {"zero_stage": 1, "sp": 2}, 2),
}


def recipe_sections(parallel: dict, micro: int, accum: int = 1) -> dict:
    return dict(
        model=MODEL,
        parallel={"sp": 1, **parallel},
        train={"max_steps": STEPS, "micro_batch_size": micro, "grad_accum_steps": accum},
        eval={"every": 0},
        checkpoint={"every": SAVED, "keep_last": 0},
        log={"every": 1, "tensorboard": False, "sample_ids": True},
    )


@pytest.fixture(scope="module")
def references(made_once, tiny_data):
    """{name: (recipe, output_dir)} of the three uninterrupted 4-rank runs, made once per test run."""

    def make(name):
        def run(tmp: Path) -> None:
            nproc, parallel, micro = REFERENCES[name]
            recipe, _ = make_recipe(tmp, tiny_data, name=f"{name}.yaml", **recipe_sections(parallel, micro))
            check(msllm_torchrun(nproc, "train", recipe, cwd=tmp))

        return run

    return {name: recipe_paths(made_once(f"elastic-{name}", make(name)), f"{name}.yaml") for name in REFERENCES}


def resume(
    tmp: Path,
    tiny_data,
    reference_out: Path,
    nproc: int,
    parallel: dict,
    micro: int,
    accum: int,
    step: int = SAVED,
    *extra: str,
):
    """A new run folder holding only checkpoint `step` of `reference_out` (and its log rows up to
    it), trained to the end on `nproc` ranks with `parallel`, micro x accum: -> (proc, output_dir)."""
    tmp.mkdir(parents=True, exist_ok=True)
    recipe, out = make_recipe(tmp, tiny_data, name=f"resumed-{nproc}.yaml", **recipe_sections(parallel, micro, accum))
    ckpt = reference_out / "checkpoints" / f"step_{step:07d}"
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    (out / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (reference_out / "metrics.jsonl").read_text().splitlines()[:step])
    )
    args = ("train", recipe, *extra)
    proc = msllm_torchrun(nproc, *args, cwd=tmp) if nproc > 1 else msllm(*args, cwd=tmp)
    return check(proc), out


def assert_continues(out: Path, reference_out: Path, after: int = SAVED) -> None:
    """Every step after `after`: the reference's global sample ids, and its loss within 1e-5."""
    want = {r["step"]: r for r in rows(reference_out)}
    got = {r["step"]: r for r in rows(out) if r["step"] > after}
    assert sorted(got) == list(range(after + 1, STEPS + 1))
    for step, row in got.items():
        assert row["sample_ids"] == want[step]["sample_ids"], step
        assert row["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step


def test_zero1_on_4_ranks_continues_on_2_ranks_with_accumulation_2(references, tmp_path, tiny_data):
    _, ref = references["z1"]
    proc, out = resume(tmp_path, tiny_data, ref, 2, {"zero_stage": 1}, micro=1, accum=2)
    assert "converting step_0000003 (saved on 4 ranks (dp 4 x sp 1), ZeRO 1" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert_continues(out, ref)


def test_zero1_on_4_ranks_continues_on_1_rank_at_zero0_then_grows_to_2_ranks_at_zero2(references, tmp_path, tiny_data):
    """4 ranks ZeRO 1 -> 1 rank ZeRO 0 (accumulation 4), stopped at step 5; that ZeRO-0
    checkpoint -> 2 ranks ZeRO 2 (accumulation 2)."""
    _, ref = references["z1"]
    _, out = resume(
        tmp_path / "one", tiny_data, ref, 1, {"zero_stage": 0}, 1, 4, SAVED, "--set", "train.stop_at_step=5"
    )
    assert max(r["step"] for r in rows(out)) == 5
    _, grown = resume(tmp_path / "two", tiny_data, out, 2, {"zero_stage": 2}, 1, 2, 5)
    want = {r["step"]: r for r in rows(ref)}
    for run, steps in ((out, (4, 5)), (grown, (6,))):
        got = {r["step"]: r for r in rows(run)}
        for step in steps:
            assert got[step]["sample_ids"] == want[step]["sample_ids"], step
            assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step


def test_zero3_on_4_ranks_continues_on_2_ranks(references, tmp_path, tiny_data):
    _, ref = references["z3"]
    _, out = resume(tmp_path, tiny_data, ref, 2, {"zero_stage": 3}, micro=1, accum=2)
    assert_continues(out, ref)


def test_zero3_on_4_ranks_continues_on_1_rank_at_zero1(references, tmp_path, tiny_data):
    _, ref = references["z3"]
    _, out = resume(tmp_path, tiny_data, ref, 1, {"zero_stage": 1}, micro=1, accum=4)
    assert_continues(out, ref)


def test_dp2_sp2_continues_on_dp1_sp2(references, tmp_path, tiny_data):
    _, ref = references["dp2sp2"]
    proc, out = resume(tmp_path, tiny_data, ref, 2, {"zero_stage": 1, "sp": 2}, micro=2, accum=2)
    assert "(dp 1 x sp 2" in proc.stdout
    assert_continues(out, ref)


def test_a_resume_that_would_change_the_global_batch_names_the_set_that_keeps_it(references, tmp_path, tiny_data):
    _, ref = references["z1"]
    recipe, out = make_recipe(tmp_path, tiny_data, **recipe_sections({"zero_stage": 1}, micro=1, accum=1))
    shutil.copytree(ref / "checkpoints" / "step_0000003", out / "checkpoints" / "step_0000003")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = msllm_torchrun(2, "train", recipe, cwd=tmp_path)
    assert proc.returncode != 0
    line = error_lines(proc)[0]
    assert "global batch of 4" in line and "--set train.grad_accum_steps=2" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing renamed, nothing converted


def test_conversion_is_made_once_beside_the_original_which_it_never_changes(references, tmp_path):
    """msllm.checkpoint.reshard.convert (rank 0's part) on a copy of the ZeRO-1 checkpoint."""
    from fixtures.reliability import tree_digest
    from msllm.checkpoint.files import verify_checkpoint
    from msllm.checkpoint.reshard import SEAL, convert, verify_universal
    from msllm.errors import ReshardError

    _, ref = references["z1"]
    ckpt = tmp_path / "checkpoints" / "step_0000003"
    shutil.copytree(ref / "checkpoints" / "step_0000003", ckpt)
    original = tree_digest(ckpt)
    folder = convert(ckpt, saved_zero_stage=1)
    assert folder == ckpt.with_name("step_0000003.universal") and (folder / SEAL).is_file()
    assert verify_universal(folder) == "" and verify_checkpoint(ckpt) == "" and tree_digest(ckpt) == original
    assert not list(ckpt.parent.glob("*.partial"))
    sealed = (folder / SEAL).stat().st_mtime_ns
    assert convert(ckpt, saved_zero_stage=1) == folder and (folder / SEAL).stat().st_mtime_ns == sealed  # once
    fp32 = next(folder.glob("zero/*/fp32.pt"))
    fp32.write_bytes(fp32.read_bytes()[:-8])  # damaged: converted again from the original
    assert verify_universal(folder) != ""
    assert convert(ckpt, saved_zero_stage=1) == folder and verify_universal(folder) == ""
    shutil.rmtree(folder)
    (ckpt / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"")  # a conversion that fails
    with pytest.raises(ReshardError, match="kept as it is"):
        convert(ckpt, saved_zero_stage=1)
    assert not folder.exists() and not list(ckpt.parent.glob("*.partial"))


def test_initial_weights_are_the_same_on_1_and_4_ranks_at_every_zero_stage(tmp_path):
    """tests/distributed/initial_weights.py: the model built as the trainer builds it (ZeRO-3:
    partitioned by deepspeed.zero.Init; ZeRO 1: materialised from the meta device), gathered,
    equals build_model(seed) in one process, bit for bit."""
    script = Path(__file__).parent / "initial_weights.py"
    proc = torchrun(4, script, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("identical") == 2, proc.stdout[-2000:]
