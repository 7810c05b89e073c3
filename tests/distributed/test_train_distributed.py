"""The trainer on 2 gloo ranks under torchrun: ZeRO stages 0-3 agree, exact resume, ZeRO-3 export."""

from __future__ import annotations

import pytest

from fixtures.train import check, losses, make_recipe, msllm, msllm_torchrun, rows, start_msllm

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_data):
    """The same 6-step recipe with 2 ranks at ZeRO stages 0, 1, 2 and 3 -> {stage: output_dir}."""
    tmp = tmp_path_factory.mktemp("zero")
    outs = {}
    for stage in (0, 1, 2, 3):
        recipe, out = make_recipe(
            tmp,
            tiny_data,
            name=f"zero{stage}.yaml",
            parallel={"zero_stage": stage},
            train={"max_steps": STEPS},
            eval={"every": 0},
            checkpoint={"every": 3},
        )
        proc = check(msllm_torchrun(2, "train", recipe, cwd=tmp))
        assert "world 2 (dp 2 x sp 1" in proc.stdout and "512 tokens/step" in proc.stdout
        outs[stage] = (recipe, out)
    return tmp, outs


def test_zero_stages_decrease_the_loss_and_agree_with_stage_0(zero_runs):
    _, outs = zero_runs
    ref = losses(outs[0][1])
    assert sorted(ref) == list(range(1, STEPS + 1))
    for stage in (1, 2, 3):
        got = losses(outs[stage][1])
        assert got[STEPS] < got[1] - 0.5, f"ZeRO {stage} did not learn: {got}"
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (stage, step)
        ref_norms = [r["grad_norm"] for r in rows(outs[0][1])]
        norms = [r["grad_norm"] for r in rows(outs[stage][1])]
        assert norms == pytest.approx(ref_norms, rel=1e-4)


@pytest.mark.parametrize("stage", [1, 3])
def test_exact_resume_two_ranks(zero_runs, stage):
    tmp, outs = zero_runs
    recipe, ref_out = outs[stage]
    resumed_recipe = tmp / f"resumed{stage}.yaml"
    resumed_out = tmp / f"resumed{stage}_run"
    resumed_recipe.write_text(recipe.read_text().replace(str(ref_out), str(resumed_out)))
    check(msllm_torchrun(2, "train", resumed_recipe, "--set", "train.stop_at_step=2", cwd=tmp))
    assert sorted(losses(resumed_out)) == [1, 2]
    proc = check(msllm_torchrun(2, "train", resumed_recipe, cwd=tmp))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert losses(resumed_out) == losses(ref_out)


def test_zero3_export_equals_stage0_weights(zero_runs, tmp_path):
    from safetensors.torch import load_file

    _, outs = zero_runs
    for stage in (0, 3):
        check(msllm("export", outs[stage][1], "--out", tmp_path / f"export{stage}"))
    w0 = load_file(str(tmp_path / "export0" / "model.safetensors"))
    w3 = load_file(str(tmp_path / "export3" / "model.safetensors"))
    assert w0.keys() == w3.keys()
    for name in w0:
        assert (w0[name] - w3[name]).abs().max().item() < 1e-4, name


def test_srun_environment_without_torchrun(tmp_path, tiny_data):
    """Two processes started as srun starts them (SLURM_PROCID / SLURM_NTASKS only) train together."""
    from fixtures.launch import clean_env, free_port

    recipe, out = make_recipe(tmp_path, tiny_data, train={"max_steps": 2}, eval={"every": 0}, checkpoint={"every": 0})
    port = str(free_port())
    procs = [
        start_msllm(
            "train",
            recipe,
            env=clean_env(
                SLURM_PROCID=str(r),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(r),
                SLURM_JOB_ID="7",
                SLURM_STEP_NODELIST="localhost",
                SLURM_STEP_TASKS_PER_NODE="2",
                MASTER_PORT=port,
            ),
        )
        for r in (0, 1)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "world 2 (dp 2 x sp 1, srun)" in results[0][0]
    assert sorted(losses(out)) == [1, 2]


def test_two_ranks_equal_one_rank_with_two_accumulation_steps(zero_runs, tmp_path, tiny_data):
    """The loss is over the global batch: 2 ranks x 1 micro-batch = 1 rank x 2 accumulated ones."""
    _, outs = zero_runs
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        train={"max_steps": STEPS, "grad_accum_steps": 2},
        eval={"every": 0},
        checkpoint={"every": 0},
    )
    check(msllm("train", recipe))
    ref, got = losses(outs[0][1]), losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
