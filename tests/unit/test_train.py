"""The trainer in one process: logs, metrics.jsonl, TensorBoard, eval, checkpoints, exact resume,
preemption, a full disk, and bad input. The pieces (schedule, parameter groups, DeepSpeed config,
launcher environment) are tested directly first."""

from __future__ import annotations

import json
import math
import shutil
import signal

import pytest

from fixtures.train import (
    check,
    error_lines,
    losses,
    make_recipe,
    msllm,
    rows,
    train_and_signal_before_step,
)
from msllm.config import from_dict
from msllm.errors import RecipeError

# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def _train_cfg(**kw):
    return from_dict({"model": {"arch": "vanilla"}, "train": kw}).train


def test_schedule_warmup_then_cosine_or_linear_to_min_lr():
    from msllm.train.engine import lr_at

    cfg = _train_cfg(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    lin = _train_cfg(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.0, schedule="linear")
    assert lr_at(35, lin) == pytest.approx(0.75)
    const = _train_cfg(max_steps=110, warmup_steps=0, lr=0.5, min_lr=0.0, schedule="constant")
    assert lr_at(0, const) == lr_at(100, const) == 0.5


def test_no_weight_decay_on_norms_and_biases_but_on_embeddings():
    import torch

    from msllm.train.engine import param_groups

    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(10, 4), "lin": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)}
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(model["embed"].weight), id(model["lin"].weight)}
    assert ids(no_decay) == {id(model["lin"].bias), id(model["norm"].weight), id(model["norm"].bias)}


def test_adamw_is_fused_on_cuda_and_foreach_elsewhere():
    """On CUDA the trainer's AdamW is torch's fused kernel, like the bare loop it is benchmarked
    against; the CPU keeps the foreach form that its figures and reference losses were taken with."""
    import torch

    from msllm.train.engine import build_optimizer

    model = torch.nn.Linear(4, 4)
    recipe = from_dict({"model": {"arch": "vanilla"}})
    fused, plain = build_optimizer(model, recipe, "cuda"), build_optimizer(model, recipe, "cpu")
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    model(torch.ones(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    fused.step()  # the guard's finiteness check in front of the fused kernel (CPU tensors here)
    assert not fused.overflow and not torch.equal(model.weight, before)


def test_deepspeed_config_from_recipe():
    from msllm.train.engine import deepspeed_config

    r = from_dict(
        {
            "model": {"arch": "vanilla"},
            "parallel": {"zero_stage": 2, "offload_optimizer": True},
            "train": {"micro_batch_size": 3, "grad_accum_steps": 5, "grad_clip": 0.5, "precision": "fp16"},
        }
    )
    cfg = deepspeed_config(r)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 5
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0 and "bf16" not in cfg
    bf = deepspeed_config(from_dict({"model": {"arch": "vanilla"}, "train": {"precision": "bf16"}}))
    assert bf["bf16"] == {"enabled": True} and "fp16" not in bf
    assert "offload_optimizer" not in bf["zero_optimization"]


def test_launcher_environments():
    from msllm.distributed.env import read_env

    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    d = read_env(env)
    assert (d.rank, d.world_size, d.local_rank) == (1, 4, 1)
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "nodeA",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    }
    d = read_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (3, 4, 1, "srun")
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["MASTER_PORT"] == "20077"
    assert env["MASTER_ADDR"] == "nodeA" and env["LOCAL_WORLD_SIZE"] == "2"
    env = {}
    d = read_env(env)
    assert (d.rank, d.world_size) == (0, 1) and env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0


def test_world_size_must_be_a_multiple_of_sp():
    from msllm.distributed import ParallelDims

    r = from_dict({"model": {"arch": "vanilla"}, "parallel": {"sp": 2}})
    assert ParallelDims.from_recipe(r, world_size=4, rank=0).dp == 2
    with pytest.raises(RecipeError, match=r"parallel.sp: 2 does not divide the world size 3"):
        ParallelDims.from_recipe(r, world_size=3, rank=0)


def test_parallel_dims_lay_out_contiguous_sequence_parallel_groups():
    """rank = dp_rank * sp + sp_rank: groups of sp contiguous ranks read the same samples (one
    replica each)."""
    from msllm.distributed import ParallelDims

    dims = [ParallelDims(world_size=8, rank=r, sp=4) for r in range(8)]
    assert [d.dp for d in dims] == [2] * 8
    assert [d.dp_rank for d in dims] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.sp_rank for d in dims] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert dims[5].sp_group_ranks() == [4, 5, 6, 7] and dims[5].sp_group_ranks(0) == [0, 1, 2, 3]
    assert dims[0].replication == 4
    assert ParallelDims(world_size=1, rank=0, sp=1).replication is None
    assert ParallelDims(world_size=2, rank=0, sp=1).replication is None


@pytest.mark.parametrize("first_bad", [1, 3])
def test_divergence_blames_the_lr_only_when_an_update_came_before_the_first_bad_gradients(first_bad):
    """Non-finite gradients from step 1 come from the weights the run started with, before any
    update: no learning rate made them (issue 35: bf16 dynamic chunking), so the error does not
    advise a lower one. From a later step on, the updates may have blown the weights up."""
    from types import SimpleNamespace

    from msllm.train.nonfinite import NonFiniteGuard
    from msllm.train.schedule import StepPlan

    checkpointer = SimpleNamespace(
        set_aside_diverged=lambda first: "no checkpoint before that is left: rerun with a lower train.lr to start over"
    )
    guard = NonFiniteGuard(max_in_a_row=2, checkpointer=checkpointer)
    engine = SimpleNamespace(was_step_applied=lambda: False)
    for step in (first_bad, first_bad + 1):
        plan = guard.check(engine, StepPlan(step=step, log=True, eval=False, checkpoint=False, last=False))
    message = str(plan.stop.error)
    assert plan.stop.reason == "divergence" and f"steps {first_bad}-{first_bad + 1}" in message
    assert ("rerun with a lower train.lr" in message) == (first_bad > 1), message
    assert first_bad > 1 or "cannot help" in message


def test_mfu_peak_of_known_accelerators_by_device_name():
    """The names torch reports for each device, the most specific entry winning; unknown: None."""
    import torch

    from msllm.metrics import known_peak_flops, peak_flops

    assert known_peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert known_peak_flops("NVIDIA H200") == 989e12
    assert known_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert known_peak_flops("NVIDIA A100-SXM4-80GB") == known_peak_flops("NVIDIA A100-PCIE-40GB") == 312e12
    assert known_peak_flops("NVIDIA L40S") == 362e12 and known_peak_flops("NVIDIA L4") == 121e12
    assert known_peak_flops("AMD Instinct MI300X") == 1307e12
    assert known_peak_flops("NVIDIA GeForce GTX 1080") is None
    assert peak_flops(torch.device("cpu"), configured=123.0) == (123.0, "train.peak_flops")


# ----------------------------------------------------------------------------------------------
# A run, its logs and its checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_logs_console_metrics_tensorboard(reference_run):
    _, out, stdout = reference_run
    assert "147,776 parameters | 256 tokens/step" in stdout
    step_lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 12
    for field in ("loss ", "lr ", "grad ", "tok/s", "mfu ", "rss ", "eta "):
        assert field in step_lines[0]
    assert sum(line.startswith("eval ") and "bpb " in line for line in stdout.splitlines()) == 2

    train = rows(out)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["tokens"] for r in train] == [256 * s for s in range(1, 13)]
    for r in train:
        assert {"step", "loss", "lr", "tokens", "grad_norm", "tokens_per_s", "mfu", "peak_rss_bytes"} <= set(r)
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["grad_norm"] > 0 and 0 < r["mfu"] < 1
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    evals = rows(out, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert 0 < r["bits_per_byte"] < r["loss"] / math.log(2)
    assert evals[1]["loss"] < evals[0]["loss"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/mfu",
        "eval/loss",
        "eval/bits_per_byte",
        "eval/perplexity",
    } <= tags
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss.keys() == losses(out).keys()
    for step, loss in losses(out).items():
        assert tb_loss[step] == pytest.approx(loss, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/bits_per_byte")] == [6, 12]


@pytest.mark.slow
def test_checkpoints_complete_and_pruned(reference_run):
    _, out, _ = reference_run
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_0000006", "step_0000012"]
    last = out / "checkpoints" / "step_0000012"
    for name in (
        "COMPLETE",
        "meta.json",
        "recipe.yaml",
        "tokenizer.model",
        "trainer_state_rank0.pt",
        "mp_rank_00_model_states.pt",
    ):
        assert (last / name).is_file(), name
    import json

    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 12 and meta["tokens"] == 12 * 256 and len(meta["tokenizer_sha256"]) == 64
    import yaml

    assert yaml.safe_load((last / "recipe.yaml").read_text())["model"]["vocab_size"] == 320
    import torch

    state = torch.load(last / "trainer_state_rank0.pt", weights_only=False)
    assert {"python", "numpy", "torch"} <= set(state["rng"]) and "sample_in_epoch" in state["dataloader"]
    client = torch.load(last / "mp_rank_00_model_states.pt", weights_only=False)["msllm"]
    assert client["step"] == 12 and client["recipe"]["model"]["arch"] == "vanilla"


@pytest.mark.slow
def test_eval_command_matches_the_last_eval(reference_run):
    recipe, out, _ = reference_run
    proc = check(msllm("eval", recipe, "--checkpoint", out))
    last = rows(out, "eval")[-1]
    line = [text for text in proc.stdout.splitlines() if text.startswith("eval ")][-1]
    assert "(step 12)" in line and f"bpb {last['bits_per_byte']:.4f}" in line


@pytest.mark.slow
def test_exact_resume_single_rank(tmp_path, tiny_data, reference_run):
    """Stopped after step 5, rerun: steps 6..12 log the same losses bit for bit (fp32, CPU)."""
    _, ref_out, _ = reference_run
    recipe, out = make_recipe(tmp_path, tiny_data)
    check(msllm("train", recipe, "--set", "train.stop_at_step=5"))
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    # A later checkpoint that never completed (no COMPLETE marker) must be ignored.
    broken = out / "checkpoints" / "step_0000009"
    broken.mkdir()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    # Rows the interrupted run logged after its last checkpoint are dropped on resume.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "loss": 0.0, "lr": 0.0, "tokens": 0}\n')
    proc = check(msllm("train", recipe))
    assert "resumed from" in proc.stdout and "step_0000005 at step 5" in proc.stdout
    assert losses(out) == losses(ref_out)  # exact equality, every step
    assert [r["step"] for r in rows(out)] == list(range(1, 13))
    assert not broken.exists()  # dropped once a newer checkpoint completed


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path, tiny_data):
    recipe, out = make_recipe(tmp_path, tiny_data, train={"max_steps": 100000}, checkpoint={"every": 0})
    code, rest, err = train_and_signal_before_step(recipe, 4, signal.SIGTERM)
    assert code == 0, err[-3000:]
    assert "stopped after step 4 on SIGTERM: checkpoint saved" in rest
    assert max(losses(out)) == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004"]
    assert (out / "checkpoints" / "step_0000004" / "COMPLETE").is_file()


_FULL_DISK = """
import errno
import deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine as engine
_save = engine.TorchCheckpointEngine.save
def save(self, state_dict, path):
    if "step_0000004" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return _save(self, state_dict, path)
engine.TorchCheckpointEngine.save = save
"""


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_data):
    recipe, out = make_recipe(tmp_path, tiny_data, train={"max_steps": 6}, checkpoint={"every": 2})
    proc = msllm("train", recipe, python_code=_FULL_DISK)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "could not save checkpoint" in line and "no space left on device" in line
    assert "the last good checkpoint is" in line and "step_0000002" in line
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000002"]
    assert (out / "checkpoints" / "step_0000002" / "COMPLETE").is_file()


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing overwritten
# ----------------------------------------------------------------------------------------------


def test_bad_override_and_flag(tmp_path, tiny_data):
    recipe, _ = make_recipe(tmp_path, tiny_data)
    proc = msllm("train", recipe, "--set", "train.max_stepz=3")
    assert proc.returncode == 2 and "unknown key train.max_stepz (did you mean train.max_steps?)" in proc.stderr
    proc = msllm("train", recipe, "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_sp_that_does_not_fit_the_world(tmp_path, tiny_data):
    recipe, out = make_recipe(tmp_path, tiny_data, parallel={"sp": 2})
    proc = msllm("train", recipe)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "parallel.sp: 2 does not divide the world size 1" in line
    assert not out.exists()


@pytest.mark.slow
def test_checkpoint_of_another_architecture(tmp_path, tiny_data, reference_run):
    _, ref_out, _ = reference_run
    bottom_up = {
        "arch": "bottom_up",
        "scales": [{"factor": 1, "layers": 1, "attention": "local", "window": 16}, {"factor": 4, "layers": 1}],
    }
    recipe, out = make_recipe(tmp_path, tiny_data, model=bottom_up)
    shutil.copytree(ref_out / "checkpoints", out / "checkpoints")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = msllm("train", recipe)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "holds a different architecture: checkpoint vanilla (" in line and "vs recipe bottom_up (" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    proc = msllm("eval", recipe, "--checkpoint", ref_out)
    assert proc.returncode == 2 and "checkpoint vanilla (" in proc.stderr and "recipe bottom_up (" in proc.stderr


def test_missing_checkpoint_for_eval(tmp_path, tiny_data):
    recipe, out = make_recipe(tmp_path, tiny_data)
    proc = msllm("eval", recipe, "--checkpoint", tmp_path / "nowhere")
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = msllm("eval", recipe, "--checkpoint", tmp_path / "empty")
    assert proc.returncode == 2 and "no complete checkpoint in" in proc.stderr


@pytest.mark.slow
def test_two_runs_of_one_recipe_log_identical_losses_and_record_what_made_them(tmp_path, tiny_data, reference_run):
    """The same recipe run twice on one machine (CPU, fp32) logs the same losses bit for bit, and
    each run folder and checkpoint records its versions, commit, data, degrees and device."""
    import torch

    ref_recipe, ref_out, _ = reference_run
    recipe, out = make_recipe(tmp_path, tiny_data)
    proc = check(msllm("train", recipe))
    assert losses(out) == losses(ref_out)
    record = json.loads((out / "run.json").read_text())
    assert record == json.loads((ref_out / "run.json").read_text()) | {"host": record["host"]}
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert (record["world_size"], record["parallel"], record["device"]) == (1, {"dp": 1, "sp": 1}, "cpu")
    assert len(record["data_manifest_sha256"]) == 64
    assert "run: msllm " in proc.stdout
    meta = json.loads((out / "checkpoints" / "step_0000012" / "meta.json").read_text())
    assert meta["run_record"] == record
    evaluated = check(msllm("eval", recipe, "--checkpoint", out))
    from msllm.run_record import describe

    assert f"trained with: {describe(record)}" in evaluated.stdout
