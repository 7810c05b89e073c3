"""The documentation: the mkdocs site builds with `--strict` (no broken link, anchor or page), its
reference pages list every recipe field and every `msllm` command (they are generated from the code
by msllm/reference.py through docs/hooks.py), and the README stays a short front page."""

from __future__ import annotations

import argparse
import dataclasses
import html
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from msllm.cli import build_parser
from msllm.config import Recipe
from msllm.reference import cli_reference, config_fields, config_reference, subcommand_names

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250


def _all_field_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every field of the recipe, walked here independently of msllm.reference."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += _all_field_keys(tp, key)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            keys += _all_field_keys(typing.get_args(tp)[0], key + "[]")
    return keys


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _text(page: Path) -> str:
    """The visible text of a built page (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "NO_MKDOCS_2_WARNING": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_the_site_builds_strict_with_every_page(site):
    nav_pages = re.findall(r":\s*([\w/.-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), flags=re.M)
    for page in nav_pages:
        built = site / (page[:-3] + "/index.html" if page != "index.md" else "index.html")
        assert built.is_file(), f"{page} is in the nav but was not built"
    written = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").glob("*.md")}
    assert written <= set(nav_pages), f"pages missing from mkdocs.yml's nav: {written - set(nav_pages)}"
    # The committed results the benchmarks page links to, the benchmarks' and the lab's, are part of
    # the site, at their paths in the repository, plots included.
    for folder in ("benchmarks", "lab/results"):
        for result in (REPO / folder).glob("*.md"):
            assert (site / folder / result.stem / "index.html").is_file(), f"{folder}/{result.name}"
        for plot in (REPO / folder).glob("*.png"):
            assert (site / folder / plot.name).is_file(), f"{folder}/{plot.name}"


def test_every_recipe_field_is_in_the_built_reference(site):
    text = _text(site / "reference" / "config" / "index.html")
    missing = [key for key in _all_field_keys() if key not in text]
    assert not missing, f"recipe fields missing from the reference page: {missing}"


def test_every_command_and_argument_is_in_the_built_reference(site):
    text = _text(site / "reference" / "cli" / "index.html")
    for name, sub in _subparsers(build_parser()).items():
        assert f"msllm {name}" in text, f"`msllm {name}` is not in the command-line reference"
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, f"`msllm {name} {option}` is not in the command-line reference"


def test_config_reference_gives_each_field_its_type_default_and_doc():
    page = config_reference()
    rows = {row.key: row for row in config_fields()}
    assert set(rows) == set(_all_field_keys())
    seq_len = rows["data.seq_len"]
    assert (seq_len.type, seq_len.default) == ("int", "1024") and seq_len.help
    assert "- **`data.seq_len`** (`int`, default `1024`): " in page
    assert "`model.scales[].factor`" in page and rows["model.scales[].factor"].help
    assert rows["model.arch"].required and "- **`model.arch`** (" in page and "required" in page
    assert rows["model.mamba"].section and "### `model.mamba`" in page
    for key, row in rows.items():
        assert row.section or row.help, f"{key} has no documentation string (doc(default, help))"


def test_cli_reference_lists_every_subcommand_with_its_help():
    page = cli_reference()
    names = subcommand_names()
    assert names == list(_subparsers(build_parser())), names
    assert {
        "show-config",
        "inspect",
        "prep",
        "train",
        "eval",
        "generate",
        "export",
        "import-hf",
        "doctor",
        "bench",
    } <= set(names)
    for name in names:
        assert f"## `msllm {name}`" in page
        assert f"usage: msllm {name}" in page
    assert "- `--temperature TEMPERATURE` (default `1.0`): " in page


def test_the_reference_text_is_escaped_for_markdown():
    from msllm.reference import _prose

    assert (
        _prose("k*d and 2**63, a_b, <unk>, [0, 1) but `x*y [z]`")
        == "k\\*d and 2\\*\\*63, a\\_b, &lt;unk>, \\[0, 1) but `x*y [z]`"
    )


def test_the_readme_is_a_short_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, f"README.md has {len(readme.splitlines())} lines"
    # .ci/run reads the test command from this block: it must be there, a fenced bash line.
    block = re.search(r"<!-- test-command -->\n```bash\n(.+)\n```", readme)
    assert block and "python -m pytest" in block[1]
    for target in re.findall(r"\]\((?!https?:)([^)#]+)", readme):
        assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"
    assert "mkdocs serve" in readme


def test_the_docs_name_no_readme_section():
    """The README's old sections live in docs/ now: nothing points at `README, Section` any more."""
    stale = re.compile(r"\(README, [A-Z]|README(\.md)?('s|,)? section|[Ss]ee (the )?README\b|README\.md[:#]\w")
    roots = ["msllm", "tests", "launchers", "docker", "recipes", "data_prep", "benchmarks", ".ci", "docs"]
    found = []
    for root in roots:
        for path in (REPO / root).rglob("*"):
            if (
                path.is_file()
                and path.suffix in (".py", ".md", ".yaml", ".sh", ".sbatch", "")
                and path != Path(__file__)
            ):
                try:
                    text = path.read_text()
                except UnicodeDecodeError:
                    continue
                found += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in stale.finditer(text)]
    assert not found, found


def test_mkdocs_yml_loads_the_hook_and_the_material_theme():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)
    assert config["theme"]["name"] == "material"
    assert config["hooks"] == ["docs/hooks.py"]
    assert config["strict"] is True
