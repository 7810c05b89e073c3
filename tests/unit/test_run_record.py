"""The record of what made a run (msllm.run_record)."""

import subprocess
from importlib import metadata

import torch

from msllm import run_record


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_state_names_the_commit_and_sees_uncommitted_changes(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert run_record.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert run_record.git_state(tmp_path) == {"commit": head, "dirty": True}
    assert run_record.git_state(tmp_path / "nowhere") == {"commit": None, "dirty": None}


def test_the_record_holds_versions_data_hash_degrees_and_device(tmp_path):
    manifest = {"seq_len": 64, "vocab_size": 8000}
    record = run_record.collect(world_size=4, dp=2, sp=2, device="cpu", manifest=manifest)
    assert record["versions"]["torch"] == metadata.version("torch")
    assert record["versions"]["deepspeed"] == metadata.version("deepspeed")
    for streaming in run_record.STREAMING:  # the one installed (docs/dependencies.md), the other None
        try:
            assert record["versions"][streaming] == metadata.version(streaming)
        except metadata.PackageNotFoundError:
            assert record["versions"][streaming] is None
    assert any(record["versions"][streaming] for streaming in run_record.STREAMING)
    assert record["versions"]["sentencepiece"] == metadata.version("sentencepiece")
    assert torch.__version__.startswith(record["versions"]["torch"].split("+")[0])
    assert record["data_manifest_sha256"] == run_record.manifest_sha256({"vocab_size": 8000, "seq_len": 64})
    assert record["data_manifest_sha256"] != run_record.manifest_sha256({"seq_len": 64, "vocab_size": 4000})
    assert (record["world_size"], record["parallel"], record["device"]) == (4, {"dp": 2, "sp": 2}, "cpu")
    run_record.write(record, tmp_path)
    assert run_record.read(tmp_path) == record
    line = run_record.describe(record)
    assert "world 4 (dp 2 x sp 2) on cpu" in line and f"torch {record['versions']['torch']}" in line
    assert " None" not in line.split("| world")[0]  # the streaming distribution that is not installed is left out
