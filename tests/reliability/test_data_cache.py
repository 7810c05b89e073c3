"""Issue 19, item 1: data.cache_dir removes only what msllm put there.

The cache used to remove `X` and `X.lock` for every free `X.lock` in the folder: pointed at a
finished run it deleted the run, pointed at a project it deleted poetry.lock, uv.lock, models.lock
and models/. Now a folder that holds anything without msllm's marker is refused (one line, nothing
touched), and in the cache's own folder only the job folders it marked are cleaned up."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from fixtures.launch import clean_env
from fixtures.reliability import cli, one_line, one_line_error, tree_digest
from fixtures.train import msllm
from msllm.data.jobcache import ENTRY_MARKER, ROOT_MARKER


def test_cache_pointed_at_a_finished_run_refuses_and_deletes_nothing(run_copy, trained_run, capsys):
    recipe, _ = trained_run
    _, other_run = run_copy  # a second finished run: checkpoints, metrics, recipe, its .lock
    before = tree_digest(other_run)
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", trained_run[1], "--set", f"data.cache_dir={other_run}")
    line = one_line(code, err, "eval")
    assert f"data.cache_dir {other_run} holds files that msllm did not put there (" in line
    assert "checkpoints/" in line and "use an empty folder or a new one" in line
    assert tree_digest(other_run) == before
    assert (other_run / ".lock").is_file() and not (other_run / ROOT_MARKER).exists()


def test_cache_pointed_at_a_project_refuses_and_deletes_nothing(tmp_path, trained_run, capsys):
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    for name in ("poetry.lock", "uv.lock", "models.lock"):
        (project / name).write_text(f"{name}: keep me\n")
    (project / "models" / "weights.bin").write_bytes(b"\x01" * 100)
    before = tree_digest(project)
    recipe, run = trained_run
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", run, "--set", f"data.cache_dir={project}")
    line = one_line(code, err, "eval")
    assert "holds files that msllm did not put there (models.lock, models/, poetry.lock, ...)" in line
    assert tree_digest(project) == before


_START = """
import sys
from pathlib import Path
from msllm.data.jobcache import start_job_cache
start_job_cache(Path(sys.argv[1]))
print("started", flush=True)
sys.stdin.readline()  # a running job holds its folder's lock until it exits
"""


def _start_job(root, tag: str, hold: bool = False):
    """A job that takes its cache folder in `root` under the job tag `tag` (and exits, or holds it)."""
    command = [sys.executable, "-c", _START, str(root)]
    env = clean_env(MSLLM_DATA_JOB=tag)
    if hold:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "started"
        return proc
    proc = subprocess.run(command, env=env, input="\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cache_still_removes_its_own_stale_folders_and_nothing_else(tmp_path):
    """What the cleanup is for: folders of finished jobs do not pile up. Only marked ones go."""
    root = tmp_path / "cache"  # absent: claimed and marked by the first job
    host = socket.gethostname()
    _start_job(root, "old")
    assert (root / ROOT_MARKER).is_file() and (root / f"old-{host}" / ENTRY_MARKER).is_file()
    cache_id = (root / ROOT_MARKER).read_text().splitlines()[0]
    assert (root / f"old-{host}.lock").read_text().strip() == cache_id
    (root / f"old-{host}" / "shard.00000.mds").write_bytes(b"\0" * 1000)  # what streaming caches there

    # Inside the claimed folder, things msllm did not mark: a folder with a free lock beside it, a
    # lone .lock, and a folder whose entry marker holds another cache's id.
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep\n")
    (root / "mine.lock").write_text("")
    (root / ".lock").write_text("")
    (root / "copied").mkdir()
    (root / "copied" / ENTRY_MARKER).write_text("0123456789abcdef\n")
    (root / "copied.lock").write_text("0123456789abcdef\n")
    foreign = {k: v for k, v in tree_digest(root).items() if not k.startswith(f"old-{host}")}

    running = _start_job(root, "running", hold=True)
    try:
        _start_job(root, "new")
        names = {p.name for p in root.iterdir()}
        assert f"old-{host}" not in names and f"old-{host}.lock" not in names  # stale: removed
        assert {f"running-{host}", f"running-{host}.lock", f"new-{host}", f"new-{host}.lock"} <= names
        assert {k: v for k, v in tree_digest(root).items() if k in foreign} == foreign  # untouched
        assert (root / ".lock").is_file()
    finally:
        running.communicate("\n", timeout=60)


@pytest.mark.slow
def test_a_job_tag_that_is_a_path_is_refused_before_anything_is_made(tmp_path, trained_run):
    """Probe class: path-like fields (MSLLM_DATA_JOB=../../victim/esc). The tag names the job's folder
    and lock in data.cache_dir: as a path it put them (and the cache's entry marker) outside it.
    Now train and eval refuse it in one line, and nothing is made inside the cache or outside it."""
    recipe, run = trained_run
    victim = tmp_path / "victim"
    victim.mkdir()
    cache = tmp_path / "a" / "b" / "cache"
    env = clean_env(MSLLM_DATA_JOB="../../victim/esc")
    for args in (
        ("train", recipe, "--set", f"run.output_dir={tmp_path / 'out'}"),
        ("eval", recipe, "--checkpoint", run),
    ):
        proc = msllm(*args, "--set", f"data.cache_dir={cache}", env=env)
        line = one_line_error(proc, args[0])
        assert "MSLLM_DATA_JOB='../../victim/esc' is not a job tag:" in line, line
        assert "set it to such a name (e.g. myjob-1), or unset it" in line, line
        assert list(victim.iterdir()) == [] and not (tmp_path / "a").exists() and not (tmp_path / "out").exists()
