"""Issue 32, item 1: msllm never writes through a link out of the folder the user named.

Each case plants a symbolic link, where msllm writes a file, to a file outside the folder, runs the
real command, and asserts a one-line refusal or a replaced link, and that the outside file is
unchanged."""

from __future__ import annotations

import json

import pytest

from fixtures.reliability import cli, one_line, one_line_error, tree_digest, write_llama_folder
from fixtures.train import check, make_recipe, msllm

OUTSIDE_TEXT = "the user's own file, outside the run folder\n"


def _outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text(OUTSIDE_TEXT)
    return outside


@pytest.mark.slow
@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "recipe.yaml", "run.json", "checkpoints", "tensorboard"])
def test_train_refuses_a_run_folder_entry_linked_outside(tmp_path, tiny_data, name):
    """Probe class: planted symlinks (a run folder entry replaced by a link to a file outside)."""
    outside = _outside(tmp_path)
    recipe, out = make_recipe(tmp_path, tiny_data, train={"max_steps": 2}, eval={"every": 0, "max_batches": 1})
    out.mkdir()
    target = outside if name in ("checkpoints", "tensorboard") else outside / "precious.txt"
    (out / name).symlink_to(target)
    before = tree_digest(outside)
    line = one_line_error(msllm("train", recipe, "--set", "log.tensorboard=true"), "train")
    assert f"{name} is a symbolic link to {target}, outside the folder" in line and "remove the link" in line
    assert tree_digest(outside) == before
    assert (outside / "precious.txt").read_text() == OUTSIDE_TEXT
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written in the run folder either


@pytest.mark.slow
def test_a_link_inside_the_run_folder_is_replaced_not_followed(tmp_path, tiny_data):
    """Probe class: planted symlinks (a link that stays inside the run folder): allowed; msllm
    replaces it by its own file."""
    recipe, out = make_recipe(tmp_path, tiny_data, train={"max_steps": 2}, eval={"every": 0, "max_batches": 1})
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")
    (out / "recipe.yaml").symlink_to("notes.txt")
    (out / "metrics.jsonl").symlink_to(out / "notes.txt")
    check(msllm("train", recipe))
    assert (out / "notes.txt").read_text() == "kept\n"
    assert not (out / "recipe.yaml").is_symlink() and "max_steps: 2" in (out / "recipe.yaml").read_text()
    assert not (out / "metrics.jsonl").is_symlink()
    assert [
        json.loads(r)["step"]
        for r in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(r)["kind"] == "train"
    ] == [1, 2]


def test_the_writers_replace_a_link_planted_after_the_start(tmp_path):
    """Probe class: planted symlinks (planted while the run trains). The run-start check aside,
    the writers themselves never follow a link: run.json and metrics.jsonl are written by rename,
    metrics.jsonl appended with O_NOFOLLOW."""
    from msllm import run_record
    from msllm.safe_files import open_append_nofollow
    from msllm.train.callbacks import JsonlLogger

    outside = _outside(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    for name in ("run.json", "metrics.jsonl"):
        (out / name).symlink_to(outside / "precious.txt")
    run_record.write({"world_size": 1}, out)
    logger = JsonlLogger(out / "metrics.jsonl", 0)
    logger.on_log({"kind": "train", "step": 1})
    logger.close()
    assert (outside / "precious.txt").read_text() == OUTSIDE_TEXT
    assert json.loads((out / "run.json").read_text()) == {"world_size": 1}
    assert (out / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'
    (out / "late.jsonl").symlink_to(outside / "precious.txt")
    with pytest.raises(OSError):
        open_append_nofollow(out / "late.jsonl")
    assert (outside / "precious.txt").read_text() == OUTSIDE_TEXT


def test_prep_lock_linked_outside_is_one_line(tmp_path, tiny_data, capsys):
    """Probe class: planted symlinks (prep's staging lock linked to a file outside)."""
    outside = _outside(tmp_path)
    recipe, _ = make_recipe(tmp_path, tiny_data)
    shards = tmp_path / "shards"
    (tmp_path / ".shards.partial.lock").symlink_to(outside / "precious.txt")
    code, _, err = cli(capsys, "prep", recipe, "--set", f"data.shards_dir={shards}")
    assert ".shards.partial.lock is a symbolic link" in one_line(code, err, "prep")
    assert (outside / "precious.txt").read_text() == OUTSIDE_TEXT
    assert not shards.exists()


def test_import_hf_out_link_is_replaced_not_written_through(tmp_path, tiny_data, capsys):
    """Probe class: planted symlinks (`import-hf --out LINK --force` where LINK leads to a recipe
    msllm wrote elsewhere): the link is replaced by the new recipe; the file it pointed to is unchanged."""
    folder = write_llama_folder(tmp_path / "llama", tiny_data[1] / "tokenizer.model")
    elsewhere = tmp_path / "elsewhere.yaml"
    code, _, err = cli(capsys, "import-hf", folder, "--out", elsewhere)
    assert code == 0, err
    before = elsewhere.read_bytes()
    link = tmp_path / "recipe.yaml"
    link.symlink_to(elsewhere)
    code, _, err = cli(capsys, "import-hf", folder, "--out", link, "--force")
    assert code == 0, err
    assert not link.is_symlink() and link.read_bytes() == before and elsewhere.read_bytes() == before


@pytest.mark.parametrize("planted", ["link", "file"])
def test_prep_staging_folder_planted_as_a_link_or_file_is_one_line(tmp_path, tiny_data, capsys, planted):
    """Probe class: `.NAME.partial` (prep's staging folder) planted as a link to a folder outside, or a file."""
    outside = _outside(tmp_path)
    recipe, _ = make_recipe(tmp_path, tiny_data)
    shards = tmp_path / "shards"
    staging = tmp_path / ".shards.partial"
    if planted == "link":
        staging.symlink_to(outside)
    else:
        staging.write_text(OUTSIDE_TEXT)
    before = tree_digest(outside)
    code, _, err = cli(capsys, "prep", recipe, "--set", f"data.shards_dir={shards}")
    line = one_line(code, err, "prep")
    assert "where msllm prep keeps its unfinished dataset, and msllm neither writes through it nor removes it" in line
    if planted == "link":
        assert f"{staging} is a symbolic link to {outside}" in line and f"remove the link (rm {staging}" in line
        assert staging.is_symlink()
    else:
        assert f"{staging} is a file" in line and staging.read_text() == OUTSIDE_TEXT
    assert "free space" not in line and tree_digest(outside) == before and not shards.exists()
