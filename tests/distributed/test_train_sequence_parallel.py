"""Sequence parallelism in training: the same recipe logs the same losses and gradient norms step
after step with sp=2 as with sp=1 (and with dp=2 x sp=2 as with dp=2 x sp=1), for every
architecture; checkpoints move between sp degrees; a recipe that does not fit the world fails
before anything starts."""

from __future__ import annotations

import pytest

from fixtures.train import check, error_lines, make_recipe, msllm_torchrun, recipe_paths, rows

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 5
MODELS = {
    "vanilla": {"arch": "vanilla", "scales": [{"factor": 1, "layers": 2, "attention": "full"}]},
    "bottom_up": {
        "arch": "bottom_up",
        "scales": [{"factor": 1, "layers": 1, "attention": "local", "window": 8}, {"factor": 4, "layers": 1}],
        "final_layers": 1,
        "aggregation": "attention",
    },
    "top_down": {
        "arch": "top_down",
        "scales": [
            {"factor": 1, "layers": 1, "attention": "local", "window": 8},
            {"factor": 2, "layers": 1},
            {"factor": 2, "layers": 1},
        ],
        "pooling": "linear",
    },
    "retina": {
        "arch": "retina",
        "scales": [{"factor": 1, "layers": 2, "window": 8}],
        "retina_factor": 2,
        "retina_levels": 3,
    },
}


def recipe_name(arch: str, nproc: int, sp: int, zero_stage: int) -> str:
    return f"{arch}-n{nproc}-sp{sp}-z{zero_stage}.yaml"


def run(tmp, tiny_data, arch: str, nproc: int, sp: int, zero_stage: int = 0, **parallel):
    recipe, out = make_recipe(
        tmp,
        tiny_data,
        name=recipe_name(arch, nproc, sp, zero_stage),
        model=MODELS[arch],
        parallel={"sp": sp, "zero_stage": zero_stage, **parallel},
        train={"max_steps": STEPS, "micro_batch_size": 2},
        eval={"every": 0, "max_batches": 2},
        checkpoint={"every": 0},
    )
    proc = check(msllm_torchrun(nproc, "train", recipe, cwd=tmp))
    assert f"(dp {nproc // sp} x sp {sp}" in proc.stdout
    return recipe, out


@pytest.fixture(scope="session")
def sp1_run(made_once, tiny_data):
    """sp1_run(arch, nproc=1, zero_stage=0) -> output_dir of the sp=1 run of `arch` on `nproc`
    ranks that the sp=2 runs are compared with: made once per test run, however many tests (and
    xdist workers) compare with it (read it, never write into it)."""

    def sp1_run(arch: str, nproc: int = 1, zero_stage: int = 0):
        name = recipe_name(arch, nproc, sp=1, zero_stage=zero_stage)
        folder = made_once(
            f"sp1_run-{name}", lambda tmp: run(tmp, tiny_data, arch, nproc=nproc, sp=1, zero_stage=zero_stage)
        )
        return recipe_paths(folder, name)[1]

    return sp1_run


def assert_same_run(got, ref):
    got_rows, ref_rows = rows(got), rows(ref)
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    for g, r in zip(got_rows, ref_rows):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), (g["step"], g["loss"], r["loss"])
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5), (g["step"], g["grad_norm"], r["grad_norm"])
    assert got_rows[-1]["tokens"] == ref_rows[-1]["tokens"]
    evals = rows(got, "eval"), rows(ref, "eval")
    assert evals[0][-1]["loss"] == pytest.approx(evals[1][-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_sp2_logs_the_losses_of_sp1(tmp_path, tiny_data, sp1_run, arch):
    _, got = run(tmp_path, tiny_data, arch, nproc=2, sp=2)
    assert_same_run(got, sp1_run(arch))


@pytest.mark.parametrize("arch", list(MODELS))
def test_dp2_sp2_logs_the_losses_of_dp2_sp1(tmp_path, tiny_data, sp1_run, arch):
    _, got = run(tmp_path, tiny_data, arch, nproc=4, sp=2, zero_stage=1)
    assert_same_run(got, sp1_run(arch, nproc=2, zero_stage=1))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sp2_with_zero_and_activation_checkpointing_logs_the_losses_of_sp1(tmp_path, tiny_data, sp1_run, zero_stage):
    """The exchanges also run inside the recomputation of checkpointed blocks, under ZeRO 2 and 3."""
    _, got = run(
        tmp_path,
        tiny_data,
        "top_down",
        nproc=2,
        sp=2,
        zero_stage=zero_stage,
        activation_checkpointing=True,
        offload_activations=zero_stage == 3,
    )
    assert_same_run(got, sp1_run("top_down"))


def test_checkpoint_saved_with_sp2_resumes_with_sp1_and_back(tmp_path, tiny_data, sp1_run):
    """The parameters do not depend on sp, and neither does the data order: a run that switches sp
    at a checkpoint logs the losses of a run that never did."""
    recipe, out = make_recipe(
        tmp_path,
        tiny_data,
        name="switch.yaml",
        model=MODELS["bottom_up"],
        parallel={"sp": 2},
        train={"max_steps": STEPS, "micro_batch_size": 2},
        eval={"every": 0, "max_batches": 2},
        checkpoint={"every": 2},
    )
    check(msllm_torchrun(2, "train", recipe, "--set", "train.stop_at_step=2", cwd=tmp_path))
    proc = check(
        msllm_torchrun(1, "train", recipe, "--set", "parallel.sp=1", "--set", "train.stop_at_step=4", cwd=tmp_path)
    )
    assert "resumed from" in proc.stdout
    proc = check(msllm_torchrun(2, "train", recipe, cwd=tmp_path))
    assert "resumed from" in proc.stdout
    assert_same_run(out, sp1_run("bottom_up"))


def test_a_recipe_that_does_not_fit_the_world_fails_before_starting(tmp_path, tiny_data):
    recipe, out = make_recipe(tmp_path, tiny_data, name="bad.yaml", model=MODELS["bottom_up"], parallel={"sp": 2})
    proc = msllm_torchrun(3, "train", recipe, cwd=tmp_path)
    assert proc.returncode != 0
    assert any("parallel.sp: 2 does not divide the world size 3" in line for line in error_lines(proc)), proc.stderr[
        -2000:
    ]
    assert not (out / "checkpoints").exists()


def test_the_16k_cpu_recipe_trains_with_sp2(tmp_path):
    """recipes/long_context/bottom_up-16k-cpu.yaml as shipped (16k tokens, sp=2, built-in corpus),
    cut to 3 steps: it prepares its shards, trains, evaluates and saves on 2 ranks."""
    recipe = "recipes/long_context/bottom_up-16k-cpu.yaml"
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    proc = check(
        msllm_torchrun(
            2,
            "train",
            repo / recipe,
            "--set",
            f"run.output_dir={out}",
            "--set",
            f"data.shards_dir={tmp_path / 'shards'}",
            "--set",
            "train.max_steps=3",
            "--set",
            "eval.max_batches=1",
            cwd=tmp_path,
            timeout=900,
        )
    )
    assert "(dp 1 x sp 2" in proc.stdout and "16,384 tokens/step" in proc.stdout
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert rows(out, "eval")[-1]["bits_per_byte"] > 0
