"""launchers/slurm/train.sbatch on an emulated two-node slurm cluster (see slurm_cluster.py)."""

from __future__ import annotations

import re

import pytest
from integ_helpers import REPO, base_env, free_ports, run, tail, wait_for

SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
DEEPSPEED_SBATCH = REPO / "launchers" / "deepspeed" / "train.sbatch"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _submit(cluster, script, workdir, args, wait: bool, timeout: float = 300):
    (workdir / "logs").mkdir(exist_ok=True)
    env = base_env_for(cluster)
    # Job ids start at 1 in every test cluster: a port of our own keeps two test sessions on this
    # machine (they share the loopback network) out of each other's rendezvous.
    env["MSLLM_RDZV_PORT"] = str(free_ports(1)[0])
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(script), *args]
    proc = run(cmd, check=False, cwd=workdir, env=env, timeout=timeout)
    job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else "?"
    return proc, job_id


def base_env_for(cluster):
    env = base_env(cluster.trainer)
    env["SLURM_CONF"] = str(cluster.conf)
    env.update(getattr(cluster, "extra_env", {}))
    return env


def _log(workdir, job_id, name="msllm"):
    return workdir / "logs" / f"{name}-{job_id}.out"


@pytest.fixture
def cluster(slurm_cluster, trainer):
    slurm_cluster.trainer = trainer
    slurm_cluster.extra_env = {}  # what a test adds for its own jobs
    return slurm_cluster


def test_sbatch_trains_on_two_nodes(cluster, trainer, shards_dir, tmp_path):
    out = tmp_path / "run"
    proc, job_id = _submit(cluster, SBATCH, tmp_path, trainer.recipe_args(out, shards_dir), wait=True)
    log = _log(tmp_path, job_id)
    assert proc.returncode == 0, f"sbatch --wait: {proc.returncode}\n{proc.stdout}\n{tail(log, 80)}"
    text = log.read_text()
    assert trainer.start_steps(text) == [0], text[-3000:]
    assert trainer.world_size(text) == 2, text[-3000:]
    if trainer.hosts(text) is not None:
        assert trainer.hosts(text) == {"node1", "node2"}, f"ranks did not run on both nodes:\n{text[-3000:]}"
    assert re.search(r"\(2 nodes x 1 ranks\), rendezvous node1:\d+", text), text[:2000]
    assert trainer.checkpoint_steps(out)[-1] == 6, f"no final checkpoint in {out}:\n{text[-3000:]}"


def test_usr1_checkpoints_requeues_and_resumes(cluster, trainer, shards_dir, tmp_path):
    out = tmp_path / "run"
    max_steps, held = 100, 6
    args = trainer.recipe_args(out, shards_dir, **{"train.max_steps": max_steps, "checkpoint.every": 4})
    # The ranks wait at step 6 (past the periodic checkpoint of step 4) until they are signalled,
    # however slowly the machine runs: the stop lands after exactly that step.
    cluster.extra_env = trainer.held_before_step(held)
    proc, job_id = _submit(cluster, SBATCH, tmp_path, args, wait=False, timeout=60)
    assert proc.returncode == 0, proc.stdout
    log = _log(tmp_path, job_id)

    # Then what slurm sends before the time limit (#SBATCH --signal=B:USR1@120): USR1 to the batch
    # shell only.
    wait_for(
        lambda: log.is_file() and "WAITING FOR A SIGNAL" in log.read_text(),
        240,
        f"the ranks to wait at step {held}",
        diagnostics=lambda: tail(log, 60) + "\n" + cluster.diagnostics(),
    )
    assert trainer.checkpoint_steps(out) == [4]
    run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster.env)

    # The script requeues the job; it starts again once its credential lifetime has passed
    # (cred_expire, 10 s in the test cluster).
    info = cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 400)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert int(info.get("Restarts", "0")) == 1, f"the job was not requeued once: {info}\n{text[-4000:]}"
    assert "asking the ranks to checkpoint and stop" in text and "requeueing job" in text, text[-4000:]
    # It stopped after the step it was signalled at, checkpointed it, and resumed from there.
    assert trainer.start_steps(text) == [0, held], f"expected a start and a resume at step {held}\n{text[-4000:]}"
    assert trainer.signal_stop_steps(text) == [held], text[-4000:]
    assert trainer.checkpoint_steps(out)[-1] == max_steps, text[-4000:]


def test_deepspeed_launcher_on_two_nodes(cluster, trainer, shards_dir, tmp_path):
    """`deepspeed --launcher slurm` with a hostfile made from the allocation, ranks mapped from srun."""
    out = tmp_path / "run"
    cluster.extra_env = {"MSLLM_HOME": str(REPO)}
    # Polled rather than `sbatch --wait` (tested above), whose polling interval grows to ~30 s.
    proc, job_id = _submit(cluster, DEEPSPEED_SBATCH, tmp_path, trainer.recipe_args(out, shards_dir), wait=False)
    assert proc.returncode == 0, proc.stdout
    log = _log(tmp_path, job_id, name="msllm-ds")
    info = cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 400)
    assert info["JobState"] == "COMPLETED", f"{info}\n{tail(log, 80)}"
    text = log.read_text()
    assert "--launcher slurm" in text or "srun -n 2" in text, text[-3000:]
    assert trainer.start_steps(text) == [0], text[-3000:]
    assert trainer.world_size(text) == 2, text[-3000:]
    if trainer.hosts(text) is not None:
        assert trainer.hosts(text) == {"node1", "node2"}, f"ranks did not run on both nodes:\n{text[-3000:]}"
    assert trainer.checkpoint_steps(out)[-1] == 6, f"no final checkpoint in {out}:\n{text[-3000:]}"
