"""Issue 32, item 4: an object store that stops answering mid-run is given up on within a bound
(msllm.data.manifest.STORE_GIVE_UP_S per shard), with one line naming the store and saying that a
rerun resumes from the last checkpoint, never waited on forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.launch import clean_env, free_port, wait_for_port
from fixtures.reliability import one_line_error
from fixtures.train import base_recipe, check, corpus_text, msllm, start_msllm, wait_for_line, write_recipe

BUCKET = "msllm-store-gone"


@pytest.fixture
def store(tmp_path):
    """(environment, server process) of a moto S3 server on 127.0.0.1 with one bucket; the test may stop it."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, server)
    env = clean_env(
        S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=BUCKET)
    try:
        yield env, server
    finally:
        server.kill()
        server.wait()


def test_store_stopped_mid_run_is_one_line_within_the_bound(tmp_path, store):
    from msllm.checkpoint.files import latest_complete, step_of
    from msllm.data.manifest import STORE_GIVE_UP_S

    env, server = store
    (tmp_path / "corpus.txt").write_text(corpus_text())
    values = base_recipe(Path("unused"), tmp_path / "corpus.txt", tmp_path / "run")
    uri = f"s3://{BUCKET}/tiny"
    # Small shards (about 15 samples each): the run downloads new ones as it goes.
    values["data"].update(shards_dir=uri, cache_dir=str(tmp_path / "cache"), shard_size_limit=4096)
    values["train"]["max_steps"] = 100000
    values["eval"]["every"] = 0
    values["checkpoint"]["every"] = 2
    recipe = write_recipe(tmp_path / "recipe.yaml", values)
    check(msllm("prep", recipe, env=env))
    proc = start_msllm("train", recipe, env=env)
    try:
        wait_for_line(proc, " 3/100000 |")  # step 2's checkpoint is saved
        server.send_signal(signal.SIGKILL)
        server.wait()
        stopped = time.monotonic()
        stdout, stderr = proc.communicate(timeout=STORE_GIVE_UP_S + 60)
        elapsed = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "train")
    assert f"the object store at {uri} is unreachable (cannot connect to the object store" in line
    assert "rerun the same command: training resumes from the last checkpoint" in line
    assert elapsed < STORE_GIVE_UP_S
    saved = latest_complete(tmp_path / "run" / "checkpoints")  # what the rerun resumes from
    assert saved is not None and step_of(saved) >= 2
