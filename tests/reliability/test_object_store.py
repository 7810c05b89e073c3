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


def _client(env: dict):
    """A boto3 S3 client of the store in `env`."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def store(tmp_path):
    """(environment, server process) of a moto S3 server on 127.0.0.1 with one bucket; the test may stop it."""
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
    _client(env).create_bucket(Bucket=BUCKET)
    try:
        yield env, server
    finally:
        server.kill()
        server.wait()


def _prepared_on_the_store(tmp_path, env) -> tuple[Path, str]:
    """(recipe, shards URI) of the tiny corpus prepared onto the store, in small shards (about 15
    samples each) so that a run downloads new ones as it goes."""
    (tmp_path / "corpus.txt").write_text(corpus_text())
    values = base_recipe(Path("unused"), tmp_path / "corpus.txt", tmp_path / "run")
    uri = f"s3://{BUCKET}/tiny"
    values["data"].update(shards_dir=uri, cache_dir=str(tmp_path / "cache"), shard_size_limit=4096)
    values["train"]["max_steps"] = 100000
    values["eval"]["every"] = 0
    values["checkpoint"]["every"] = 2
    recipe = write_recipe(tmp_path / "recipe.yaml", values)
    check(msllm("prep", recipe, env=env))
    return recipe, uri


def _ended(proc: subprocess.Popen, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """`proc` run to its end (killed if it outlives `timeout`, a hang guard): (its result, seconds taken)."""
    started = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - started


@pytest.mark.slow
def test_store_stopped_mid_run_is_one_line_within_the_bound(tmp_path, store):
    """Probe class: the object store going away (the S3 server killed mid-run)."""
    from msllm.checkpoint.files import latest_complete, step_of
    from msllm.data.manifest import STORE_GIVE_UP_S

    env, server = store
    recipe, uri = _prepared_on_the_store(tmp_path, env)
    proc = start_msllm("train", recipe, env=env)
    try:
        wait_for_line(proc, " 3/100000 |")  # step 2's checkpoint is saved
        server.send_signal(signal.SIGKILL)
        server.wait()
    finally:
        result, elapsed = _ended(proc, STORE_GIVE_UP_S + 60)
    line = one_line_error(result, "train")
    assert f"the object store at {uri} is unreachable (cannot connect to the object store" in line
    assert "rerun the same command: training resumes from the last checkpoint" in line
    assert elapsed < STORE_GIVE_UP_S
    saved = latest_complete(tmp_path / "run" / "checkpoints")  # what the rerun resumes from
    assert saved is not None and step_of(saved) >= 2


@pytest.mark.slow
def test_a_shard_object_missing_from_the_store_is_named(tmp_path, store):
    """Probe class: the object store going away (one shard object deleted from the store). It
    was worded "the store is unreachable (not found ...)"; now the line names the missing object
    and the store, and says how to restore it."""
    env, _ = store
    recipe, uri = _prepared_on_the_store(tmp_path, env)
    client = _client(env)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="tiny/train/")["Contents"])
    shards = [k for k in keys if "/shard." in k]
    assert len(shards) > 3
    missing = shards[len(shards) // 2]
    client.delete_object(Bucket=BUCKET, Key=missing)
    result, _ = _ended(start_msllm("train", recipe, env=env), 600)
    line = one_line_error(result, "train")
    assert f"s3://{BUCKET}/{missing} is missing from the object store at {uri} (not found)" in line, line
    assert "restore the object (or remove the dataset there and run `msllm prep RECIPE` again)" in line, line
    assert "rerun the same command: training resumes from the last checkpoint" in line, line


# The store's bounds made short (a 2 s connect and read timeout) for the frozen-store case, so
# that the test waits seconds for the bound instead of STORE_GIVE_UP_S (240 s); the logic is the same.
SHORT_WAITS = """
import msllm.data.manifest as _manifest, msllm.data.loader as _loader
_manifest.CONNECT_TIMEOUT_S = _manifest.DOWNLOAD_TIMEOUT_S = _loader.DOWNLOAD_TIMEOUT_S = 2
_manifest.STORE_GIVE_UP_S = _manifest.DOWNLOAD_RETRIES * _manifest.CLIENT_ATTEMPTS * (2 + 2)
"""
SHORT_GIVE_UP_S = 2 * 3 * (2 + 2)


@pytest.mark.slow
def test_a_store_frozen_mid_run_is_one_line_within_the_bound(tmp_path, store):
    """Probe class: the object store going away (the S3 server frozen by SIGSTOP mid-run: it
    accepts connections and never answers). The read timeouts bound it: one line, exit 2, the
    last checkpoint kept; with the bounds shortened to 2 s, within SHORT_GIVE_UP_S (24 s) plus 60 s
    of slack for start and stop (a hang guard, not a measurement)."""
    from msllm.checkpoint.files import latest_complete, step_of

    env, server = store
    recipe, uri = _prepared_on_the_store(tmp_path, env)
    proc = start_msllm("train", recipe, env=env, python_code=SHORT_WAITS)
    try:
        wait_for_line(proc, " 3/100000 |")  # step 2's checkpoint is saved
        server.send_signal(signal.SIGSTOP)
    finally:
        result, elapsed = _ended(proc, SHORT_GIVE_UP_S + 120)
        server.send_signal(signal.SIGCONT)
    line = one_line_error(result, "train")
    assert f"the object store at {uri} is unreachable (the object store did not answer in time" in line, line
    assert "rerun the same command: training resumes from the last checkpoint" in line
    assert elapsed < SHORT_GIVE_UP_S + 60
    saved = latest_complete(tmp_path / "run" / "checkpoints")
    assert saved is not None and step_of(saved) >= 2
