"""Several jobs on one host: scoped shared memory, a shared shards folder nobody writes into."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.launch import clean_env, torchrun_command
from fixtures.train import losses, make_recipe

_HOLDER = """
import sys
from msllm.config import DataConfig
from msllm.data import build_dataloader
from msllm.data.jobcache import job_tag
cfg = DataConfig(source="shards", shards_dir=sys.argv[1], seq_len=int(sys.argv[2]), cache_dir=sys.argv[3])
stream = iter(build_dataloader(cfg, "train", batch_size=2, seed=0))
next(stream)
print(job_tag(), flush=True)
sys.stdin.readline()  # another job starts meanwhile
batches = [next(stream) for _ in range(50)]
print("read", len(batches), flush=True)
"""


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _shared_memory(tag: str) -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"msllm-{tag}_")}


def test_a_job_starting_leaves_the_shared_memory_of_a_running_job_alone(data_small_corpus, tmp_path):
    cfg, _ = data_small_corpus
    args = [cfg.shards_dir, str(cfg.seq_len), str(tmp_path / "cache")]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, *args],
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tag = holder.stdout.readline().strip()
        assert tag, holder.stderr.read()
        blocks = _shared_memory(tag)
        assert blocks  # streaming's blocks of the running job, named after it

        # Another job on the host starts (and cleans what crashed attempts of itself left).
        other = subprocess.run(
            [sys.executable, "-c", _HOLDER, *args],
            env=clean_env(),
            input="\n",
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert other.returncode == 0 and "read 50" in other.stdout, other.stderr
        assert _shared_memory(tag) == blocks

        out, err = holder.communicate("\n", timeout=300)
        assert holder.returncode == 0 and "read 50" in out, err
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not _shared_memory(tag)  # freed at exit


@pytest.mark.slow
@pytest.mark.distributed
def test_two_trainings_started_at_once_on_one_read_only_shards_folder_both_complete(tiny_data, tmp_path):
    """Two 2-rank jobs, same shards (a fresh copy nobody read before: no warm-up), at one moment."""
    corpus, shards = tiny_data
    fresh = tmp_path / "shared_shards"
    shutil.copytree(shards, fresh)
    before = _tree(fresh)
    jobs = []
    for name in ("a", "b"):
        recipe, out = make_recipe(tmp_path, (corpus, fresh), name=f"{name}.yaml", train={"max_steps": 4})
        command = torchrun_command(2, "-m", "msllm.cli", "train", recipe)
        jobs.append(
            (
                subprocess.Popen(
                    command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
                ),
                out,
            )
        )
    results = [(proc.communicate(timeout=600), proc.returncode, out) for proc, out in jobs]
    for (stdout, stderr), returncode, _ in results:
        assert returncode == 0, f"STDOUT\n{stdout[-3000:]}\nSTDERR\n{stderr[-3000:]}"
    # The same recipe on the same shards: the same losses, so neither job read the other's state.
    (_, _, out_a), (_, _, out_b) = results
    assert losses(out_a) == losses(out_b) and sorted(losses(out_a)) == [1, 2, 3, 4]
    assert _tree(fresh) == before  # nothing written into the shards folder


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_first_read_one_shards_folder_at_the_same_moment(data_small_corpus, tmp_path):
    """Two "nodes" (2-rank torchrun jobs of the data script) and a job on other shards, at once."""
    cfg, _ = data_small_corpus
    fresh, other = tmp_path / "shared", tmp_path / "other"
    shutil.copytree(cfg.shards_dir, fresh)
    shutil.copytree(cfg.shards_dir, other)
    before = _tree(fresh)
    script = Path(__file__).parent / "data_torchrun_script.py"
    procs = []
    for name, shards_dir in (("node0", fresh), ("node1", fresh), ("other", other)):
        command = torchrun_command(2, script, shards_dir, cfg.seq_len, tmp_path / name)
        procs.append(
            subprocess.Popen(command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"STDOUT\n{stdout[-3000:]}\nSTDERR\n{stderr[-3000:]}"
    results = {
        name: [json.loads((tmp_path / f"{name}.{rank}.json").read_text()) for rank in (0, 1)]
        for name in ("node0", "node1", "other")
    }
    assert results["node0"] == results["node1"] == results["other"]  # same shards content, same batches
    assert _tree(fresh) == before
