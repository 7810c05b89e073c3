"""Issue 12, item 8: `msllm export` never writes over its own source, and --force over a file
leaves nothing behind (a file is refused: it is not msllm's)."""

from __future__ import annotations

import pytest

from fixtures.reliability import cli, one_line, tree_digest


@pytest.mark.parametrize("target", ["run", "run/checkpoints", "checkpoint", "parent"])
def test_export_target_overlapping_the_source_refused(run_copy, capsys, target):
    _, out = run_copy
    ckpt = out / "checkpoints" / "step_0000006"
    source, dest = {
        "run": (out, out),
        "run/checkpoints": (out, out / "checkpoints"),
        "checkpoint": (ckpt, ckpt),
        "parent": (ckpt, out),
    }[target]
    before = tree_digest(out)
    code, _, err = cli(capsys, "export", source, "--out", dest, "--force")
    assert "is, contains or lies inside the checkpoint source" in one_line(code, err, "export")
    assert tree_digest(out) == before


def test_export_force_over_a_file_is_refused_and_leaves_nothing_behind(run_copy, tmp_path, capsys):
    """Issue 32, item 2: a file in the way is the user's: --force does not replace it."""
    _, out = run_copy
    dest = tmp_path / "exported"
    dest.write_text("a file in the way\n")
    code, _, err = cli(capsys, "export", out, "--out", dest, "--force")
    assert "is a file and is not an msllm export" in one_line(code, err, "export")
    assert dest.read_text() == "a file in the way\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")) == []
