"""Issue 32, item 2: --force never deletes what msllm did not make. `msllm prep --force`, `msllm
export --force` and `msllm import-hf --force` replace only a dataset, export or recipe that msllm
wrote; a folder of the user's files (or a file) at the target is refused in one line that does not
offer --force, and every file there survives."""

from __future__ import annotations

import shutil

import pytest

from fixtures.reliability import cli, one_line, tree_digest, write_llama_folder
from fixtures.train import make_recipe


def _user_folder(path):
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work\n")
    (path / "notes" / "ideas.md").write_text("more work\n")
    return tree_digest(path)


@pytest.mark.parametrize("force", [True, False])
def test_prep_into_a_folder_of_user_files_deletes_nothing(tmp_path, tiny_data, capsys, force):
    """Probe class: `prep --force` on a user's folder (data.shards_dir naming a folder of the
    user's own files), with and without --force."""
    recipe, _ = make_recipe(tmp_path, tiny_data)
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    code, _, err = cli(capsys, "prep", recipe, *(["--force"] if force else []), "--set", f"data.shards_dir={mine}")
    line = one_line(code, err, "prep")
    assert f"data.shards_dir {mine} holds files that msllm did not put there (notes/, thesis.tex)" in line
    assert "msllm never replaces what it did not write" in line and "--force" not in line
    assert tree_digest(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".mine.old")) == []


def test_prep_force_replaces_its_own_dataset_and_removes_the_aside_copy(tmp_path, tiny_data, capsys):
    """Probe class: `prep --force` on msllm's own dataset (what --force is for still works)."""
    recipe, _ = make_recipe(tmp_path, tiny_data)
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data[1], shards)
    (shards / "stray.txt").write_text("inside msllm's dataset: goes with it\n")
    code, out, err = cli(capsys, "prep", recipe, "--force", "--set", f"data.shards_dir={shards}")
    assert code == 0 and "msllm prep: wrote" in out, err
    assert not (shards / "stray.txt").exists() and (shards / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".shards")) == [".shards.partial.lock"]


@pytest.mark.parametrize("what", ["folder", "file"])
def test_export_force_over_user_files_deletes_nothing(run_copy, tmp_path, capsys, what):
    """Probe class: `export --force` on a user's folder (or a user's file)."""
    _, out = run_copy
    dest = tmp_path / "mine"
    if what == "folder":
        before = _user_folder(dest)
    else:
        dest.write_text("a file of the user's\n")
    code, _, err = cli(capsys, "export", out, "--out", dest, "--force")
    line = one_line(code, err, "export")
    assert f"--out {dest} " in line and "is not an msllm export" in line and "--force" not in line
    if what == "folder":
        assert tree_digest(dest) == before
    else:
        assert dest.read_text() == "a file of the user's\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".mine")) == []


def test_export_force_replaces_its_own_export(run_copy, tmp_path, capsys):
    """Probe class: `export --force` on msllm's own export (what --force is for still works)."""
    _, out = run_copy
    dest = tmp_path / "exported"
    for args in ([], ["--force"]):
        code, _, err = cli(capsys, "export", out / "checkpoints" / "step_0000003", "--out", dest, *args)
        assert code == 0, err
    code, _, err = cli(capsys, "export", out, "--out", dest, "--force")
    assert code == 0, err
    assert '"step": 6' in (dest / "export.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")) == []


def test_import_hf_force_over_a_user_file_deletes_nothing(tmp_path, tiny_data, capsys):
    """Probe class: `import-hf --out FILE --force` on a user's own file."""
    folder = write_llama_folder(tmp_path / "llama", tiny_data[1] / "tokenizer.model")
    mine = tmp_path / "recipe.yaml"
    mine.write_text("run: {name: my own recipe}\n")
    code, _, err = cli(capsys, "import-hf", folder, "--out", mine, "--force")
    line = one_line(code, err, "import-hf")
    assert "is not a recipe `msllm import-hf` wrote" in line and "--force" not in line
    assert mine.read_text() == "run: {name: my own recipe}\n"
    mine.unlink()
    for args in ([], ["--force"]):  # its own recipe: replaced with --force
        code, _, err = cli(capsys, "import-hf", folder, "--out", mine, *args)
        assert code == 0, err


@pytest.mark.needs_root("mounts a tmpfs and makes it read-only")
def test_import_hf_force_failure_names_out_not_a_temporary_file(tmp_path, tiny_data, capsys):
    """Probe class: `import-hf --out R --force` where R cannot be replaced (a read-only file system)."""
    import subprocess

    folder = write_llama_folder(tmp_path / "llama", tiny_data[1] / "tokenizer.model")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "recipe.yaml"
        code, _, err = cli(capsys, "import-hf", folder, "--out", out)
        assert code == 0, err
        before = out.read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, _, err = cli(capsys, "import-hf", folder, "--out", out, "--force")
        line = one_line(code, err, "import-hf")
        assert line == (
            f"msllm import-hf: error: cannot write --out {out}: Read-only file system; the recipe there is unchanged"
        ), line
        assert ".tmp-" not in line and out.read_bytes() == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
