"""Shards in object storage, against a real S3-compatible HTTP server on 127.0.0.1 (moto's).

The server checks signatures (moto's IAM authentication): the test makes a user and an access
key with its first requests, then every request must be signed with that key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.launch import clean_env, free_port, wait_for_port
from fixtures.train import base_recipe, check, corpus_text, losses, msllm, msllm_torchrun, write_recipe

BUCKET = "msllm-test"
_REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """Environment variables for a running moto server with one bucket and a signed-in user."""
    import boto3

    if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("moto_server is not installed: pip install 'msllm[dev]' (it brings moto[server])")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},  # user, key, policy; then signed only
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_port(port, server, log.read_text() if log.exists() else "")
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name=_REGION, aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        iam.create_user(UserName="msllm")
        key = iam.create_access_key(UserName="msllm")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="msllm", PolicyName="all", PolicyDocument=json.dumps(policy))
        env = {
            "S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": _REGION,
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=_REGION,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=BUCKET)
        yield env, s3
    finally:
        server.terminate()
        server.wait(timeout=30)


def _s3_env(env: dict, **extra: str) -> dict:
    # No profile or config file of the machine running the tests may stand in.
    return clean_env(**{**env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **extra})


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    return msllm(*args, env=env)


@pytest.mark.slow
@pytest.mark.distributed
def test_prep_to_s3_then_two_ranks_train_from_it_and_resume_exactly(s3_server, tmp_path):
    env, s3 = s3_server
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text())
    shards_uri = f"s3://{BUCKET}/tiny"

    def recipe(name: str):
        out = tmp_path / f"{name}_run"
        values = base_recipe(Path("unused"), corpus, out)
        values["data"].update(
            shards_dir=shards_uri, cache_dir=str(tmp_path / "cache"), workers=2, prep_checkpoint_bytes=20000
        )
        values["train"]["max_steps"] = 6
        values["checkpoint"]["every"] = 3
        values["eval"]["every"] = 3
        return write_recipe(tmp_path / f"{name}.yaml", values), out

    first, first_out = recipe("first")
    prep = check(_cli(_s3_env(env), "prep", first))
    assert f"wrote {shards_uri}" in prep.stdout
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="tiny/")["Contents"]}
    assert {"tiny/manifest.json", "tiny/tokenizer.model", "tiny/train/index.json", "tiny/validation/index.json"} <= keys
    assert {"tiny/train/part-00000/index.json", "tiny/train/part-00001/index.json"} <= keys  # saved in parts
    index = json.loads(s3.get_object(Bucket=BUCKET, Key="tiny/train/index.json")["Body"].read())
    assert {f"tiny/train/{s['zip_data']['basename']}" for s in index["shards"]} <= keys
    assert not list((tmp_path / "cache").glob("prep-*.partial/*"))  # the local staging copy is gone
    assert "is up to date" in check(_cli(_s3_env(env), "prep", first)).stdout

    # 2 ranks read the shards from the bucket; a run stopped at step 3 and resumed matches it.
    check(msllm_torchrun(2, "train", first, env=_s3_env(env), cwd=tmp_path))
    second, second_out = recipe("second")
    check(msllm_torchrun(2, "train", second, "--set", "train.stop_at_step=3", env=_s3_env(env), cwd=tmp_path))
    assert sorted(losses(second_out)) == [1, 2, 3]
    resumed = check(msllm_torchrun(2, "train", second, env=_s3_env(env), cwd=tmp_path))
    assert "at step 3" in resumed.stdout
    assert losses(second_out) == losses(first_out) and sorted(losses(first_out)) == list(range(1, 7))


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_missing_bucket_bad_credentials_and_unreachable_endpoint_are_one_line_errors(s3_server, tmp_path):
    env, _ = s3_server
    (tmp_path / "corpus.txt").write_text(corpus_text(40))

    def recipe(shards_uri: str, source: str = "text") -> Path:
        values = base_recipe(Path("unused"), tmp_path / "corpus.txt", tmp_path / "run")
        values["data"].update(shards_dir=shards_uri, source=source, cache_dir=str(tmp_path / "cache"))
        return write_recipe(tmp_path / "recipe.yaml", values)

    line = _one_line_error(_cli(_s3_env(env), "prep", recipe("s3://no-such-bucket/x")))
    assert (
        line == "msllm prep: error: cannot write to s3://no-such-bucket/x: the bucket does not exist (create it first)"
    )
    line = _one_line_error(_cli(_s3_env(env), "prep", recipe("s3://no-such-bucket/x", source="shards")))
    assert line == (
        "msllm prep: error: s3://no-such-bucket/x/manifest.json does not exist (check the bucket and the path in "
        "data.shards_dir)"
    )

    # Wrong credentials and a closed port, when preparing (which reads the manifest first, if
    # any) and when reading shards as training does (source: shards).
    wrong_secret = _s3_env(env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    closed = _s3_env(env, S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for source in ("text", "shards"):
        line = _one_line_error(_cli(wrong_secret, "prep", recipe(f"s3://{BUCKET}/y", source=source)))
        assert line.startswith(
            f"msllm prep: error: cannot download s3://{BUCKET}/y/manifest.json: access denied (403): "
            "check the credentials"
        )
        line = _one_line_error(_cli(closed, "prep", recipe(f"s3://{BUCKET}/z", source=source)))
        assert line.startswith(
            f"msllm prep: error: cannot download s3://{BUCKET}/z/manifest.json: cannot connect to the object store "
            f"(S3_ENDPOINT_URL={closed['S3_ENDPOINT_URL']})"
        )
