"""What a user sees of the `msllm` command itself: --version, --help, the help of every flag,
show-config's display, and the small print details (plurals, .gitignore)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from fixtures.train import msllm
from msllm.cli import DESCRIPTION, build_parser
from msllm.config import from_dict, load_recipe

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_installed_package_version():
    proc = msllm("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"msllm {version('msllm')}"


def test_help_describes_the_tool_for_its_users():
    proc = msllm("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert DESCRIPTION in text
    assert "thin layer" not in text  # the module docstring is for developers
    assert "--version" in text


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_has_help():
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"show-config", "inspect", "prep", "train", "eval", "generate", "export", "bench"} <= set(commands)
    missing = [
        f"msllm {name} {'/'.join(a.option_strings) or a.dest}"
        for name, sub in [("", parser), *commands.items()]
        for a in sub._actions
        if not isinstance(a, argparse._SubParsersAction) and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert not missing, missing
    helps = {a.dest: a.help for a in commands["generate"]._actions}
    assert "greedy" in helps["temperature"] and "0 keeps them all" in helps["top_k"]


def test_bench_help_says_where_results_go():
    text = " ".join(msllm("bench", "--help").stdout.split())
    assert "append" in text and "benchmarks/" in text and "unless --out" in text


@pytest.mark.slow
def test_bench_outside_a_checkout_names_the_missing_recipes_and_the_lab_in_one_line(tmp_path):
    """Where no recipes/ is (an installed package, another folder), a benchmark that measures the
    shipped recipes says which file and --recipes; a moved experiment names python -m lab."""
    done = msllm("bench", "models", "--out", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "msllm bench: error: no recipe recipes/models: this benchmark measures the recipes shipped in the msllm "
        "repository; pass --recipes DIR (the recipes/ folder of a checkout)"
    ]
    assert not (tmp_path / "out").exists()
    done = msllm("bench", "models", "--out", tmp_path / "out", "--recipes", REPO / "recipes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "/models/vanilla-bookcorpus.yaml | vanilla | 14 |" in (tmp_path / "out" / "models.md").read_text()
    moved = msllm("bench", "paper", "--out", tmp_path / "out", cwd=tmp_path)
    assert moved.returncode == 2
    assert moved.stderr.strip().splitlines() == [
        "msllm bench: error: paper is an experiment of the msllm repository, no longer a benchmark of the package: "
        "from a checkout, run python -m lab paper"
    ]


def test_show_config_omits_the_window_where_no_scale_reads_it(tmp_path):
    path = tmp_path / "bottom_up.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "recipes/quickstart.yaml"),
                "model": {
                    "scales": [
                        {"factor": 1, "layers": 2, "attention": "local", "window": 64},
                        {"factor": 4, "layers": 3, "attention": "full", "window": 32},
                    ]
                },
            }
        )
    )
    proc = msllm("show-config", str(path))
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)["model"]["scales"]
    assert shown == [
        {"factor": 1, "layers": 2, "attention": "local", "window": 64},
        {"factor": 4, "layers": 3, "attention": "full"},
    ]

    recipe = load_recipe(path)
    # What run folders and checkpoints save keeps every field, and loads back to the same recipe.
    saved = yaml.safe_load(recipe.to_yaml())
    assert [s["window"] for s in saved["model"]["scales"]] == [64, 32]
    assert from_dict(saved) == recipe
    # The displayed form loads back to the same recipe but for the window nothing reads.
    again = from_dict(yaml.safe_load(recipe.to_display_yaml()))
    assert [s.window for s in again.model.scales] == [64, 128]  # the default
    fixed = [dataclasses.replace(s, window=32) if s.attention == "full" else s for s in again.model.scales]
    assert dataclasses.replace(again, model=dataclasses.replace(again.model, scales=fixed)) == recipe


def test_show_config_keeps_retinas_window_whatever_its_attention(tmp_path):
    path = tmp_path / "retina-full.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "recipes/models/retina-tiny.yaml"),
                "model": {"scales": [{"factor": 1, "layers": 2, "attention": "full", "window": 48}]},
            }
        )
    )
    proc = msllm("show-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["scales"][0]["window"] == 48


def test_the_cpu_peak_names_one_thread_in_the_singular(monkeypatch):
    import torch

    from msllm import metrics as callbacks

    monkeypatch.setattr(callbacks, "cpu_peak_flops", lambda: 1e9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert callbacks.peak_flops(torch.device("cpu"))[1] == "best measured fp32 matmul, 1 thread"
        torch.set_num_threads(2)
        assert callbacks.peak_flops(torch.device("cpu"))[1] == "best measured fp32 matmul, 2 threads"
    finally:
        torch.set_num_threads(threads)
    # The paper experiment's table says the same in the singular: tests/lab/test_paper.py.


def test_exports_are_ignored_by_git():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing reads .gitignore")
    proc = subprocess.run(["git", "check-ignore", "-q", "exports/quickstart/model.safetensors"], cwd=REPO)
    assert proc.returncode == 0, "exports/ (where the README's `msllm export` writes) is not in .gitignore"
