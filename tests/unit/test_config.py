"""Recipes: inheritance, overrides, and one clear line for every kind of mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fixtures.train import check, msllm
from msllm.config import field_docs, load_recipe, validate, with_vocab_size
from msllm.errors import RecipeError
from msllm.inspect import inspect_recipe, parameters_by_part
from msllm.models import build_model
from msllm.train.memory import count_parameters, parameter_state_bytes

REPO = Path(__file__).resolve().parents[2]
# The recipes users start from and the lab's experiments' own (lab/recipes): every one must load.
RECIPES = sorted(p for folder in ("recipes", "lab/recipes") for p in (REPO / folder).rglob("*.yaml"))

GOOD = """
run: {name: t, output_dir: out}
model:
  arch: bottom_up
  d_model: 64
  n_heads: 4
  scales:
    - {factor: 1, layers: 1, attention: local, window: 16}
    - {factor: 4, layers: 1}
data: {seq_len: 128}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# What a recipe's header says `msllm inspect` printed for one rank's parameters: "parameters 7.2".
_HEADER_PARAMETERS = re.compile(r"`msllm inspect [^`]*`.*?\bparameters ([\d,]+\.\d)", re.S)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads_and_builds_its_model(path):
    """Each shipped recipe validates with its vocabulary filled in, builds its model on the meta
    device (no memory), and counts the parameters that `msllm inspect` counts and its header says."""
    recipe = load_recipe(path)  # type-checked and validated
    recipe = with_vocab_size(
        recipe, recipe.data.tokenizer.data_vocab_size()
    )  # what training does once the tokenizer exists
    validate(recipe, source=str(path))
    with torch.device("meta"):
        model = build_model(recipe.model)
    assert all(p.is_meta for p in model.parameters())
    n = count_parameters(model)  # msllm.train.memory's count: tied weights once
    assert n == sum(parameters_by_part(model).values())  # inspect's table of parts adds up to it
    assert n > recipe.model.vocab_size * recipe.model.d_model  # more than the embeddings
    if n <= 20_000_000:  # small enough to build for real on this CPU, as `msllm inspect` does
        assert inspect_recipe(recipe, measure=False)["parameters"] == n
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    stated = _HEADER_PARAMETERS.search(header)
    if stated:  # one rank's weights in MiB, as inspect prints them (one data-parallel replica)
        weights, _, _ = parameter_state_bytes(n, recipe.train.precision, recipe.parallel.zero_stage, dp=1)
        assert stated.group(1) == f"{weights / 2**20:,.1f}", f"{path.name}: the header's parameter figure is stale"


def test_base_chain_merges_sections_and_overrides_apply_last(tmp_path):
    write(tmp_path, GOOD, "base.yaml")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "base: ../base.yaml\ntrain: {lr: 1.0e-3}\nmodel: {d_model: 128}\n", "mid.yaml")
    top = write(tmp_path, "base: sub/mid.yaml\nrun: {name: top}\n", "top.yaml")
    recipe = load_recipe(top, ["train.max_steps=7", "model.pooling=linear", "train.lr=2e-3"])
    assert recipe.run.name == "top" and recipe.run.output_dir == "out"
    assert recipe.model.d_model == 128 and recipe.model.n_heads == 4 and recipe.model.arch == "bottom_up"
    assert recipe.train.max_steps == 7 and recipe.train.lr == 2e-3 and recipe.model.pooling == "linear"
    assert recipe.model.scales[1].factor == 4


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    again = load_recipe(write(tmp_path, recipe.to_yaml(), "again.yaml"))
    assert again == recipe


BAD = [
    (
        "unknown key with suggestion",
        GOOD + "train: {learning_rate: 0.1}\n",
        "unknown key train.learning_rate (did you mean train.lr",
    ),
    ("unknown section", GOOD + "trian: {lr: 0.1}\n", "unknown key trian (did you mean train?)"),
    (
        "wrong type",
        GOOD.replace("d_model: 64", "d_model: sixty-four"),
        "model.d_model: expected an integer, got str 'sixty-four'",
    ),
    ("bool for int", GOOD + "train: {max_steps: true}\n", "train.max_steps: expected an integer, got bool True"),
    (
        "bad choice",
        GOOD.replace("arch: bottom_up", "arch: sideways"),
        "model.arch: 'sideways' is not one of 'vanilla', 'bottom_up', 'top_down', 'retina'",
    ),
    ("missing arch", "model: {d_model: 64}\n", "missing required value model.arch"),
    (
        "heads do not divide",
        GOOD.replace("n_heads: 4", "n_heads: 3"),
        "model.n_heads: d_model 64 is not divisible by n_heads 3",
    ),
    (
        "seq_len not a multiple",
        GOOD.replace("seq_len: 128", "seq_len: 130"),
        "data.seq_len: 130 is not a multiple of the cumulative pooling factor 4",
    ),
    (
        "factor 1 at a coarse scale",
        GOOD.replace("{factor: 4, layers: 1}", "{factor: 1, layers: 1}"),
        "model.scales[1].factor: a coarser scale needs a pooling factor >= 2, got 1",
    ),
    (
        "one scale for bottom-up",
        GOOD.replace("    - {factor: 4, layers: 1}\n", ""),
        "model.scales: bottom_up needs at least two scales",
    ),
    (
        "two scales for vanilla",
        GOOD.replace("arch: bottom_up", "arch: vanilla"),
        "model.scales: vanilla has a single stack: give exactly one scale, got 2",
    ),
    ("negative steps", GOOD + "train: {max_steps: -5}\n", "train.max_steps: must be at least 1, got -5"),
    (
        "text source without paths",
        GOOD + "data: {source: text, seq_len: 128}\n",
        "data.paths: source 'text' needs at least one file",
    ),
    ("sp does not divide heads", GOOD + "parallel: {sp: 3}\n", "parallel.sp: n_heads 4 is not divisible by sp 3"),
    (
        "sp does not split a scale",
        GOOD.replace("seq_len: 128", "seq_len: 4") + "parallel: {sp: 2}\n",
        "parallel.sp: scale 1 has L/f_s = 4/4 positions, which do not split evenly over sp=2 ranks",
    ),
    (
        "window longer than a rank's slice",
        GOOD.replace("window: 16", "window: 128") + "parallel: {sp: 2}\n",
        "model.scales[0].window: window 128 is longer than the 64 positions each of the sp=2 ranks holds at scale 0",
    ),
    (
        "retina blocks straddle ranks",
        "model: {arch: retina, n_heads: 4, retina_factor: 4, retina_levels: 3, scales: [{window: 8}]}\n"
        "data: {seq_len: 72}\nparallel: {sp: 2}\n",
        "parallel.sp: retina's coarsest blocks of 16 tokens must not straddle ranks: data.seq_len/sp = 36",
    ),
    ("list expected", GOOD + "train: {betas: 0.9}\n", "train.betas: expected a list, got float 0.9"),
    ("section not a mapping", GOOD + "eval: 5\n", "eval: expected a mapping, got int 5"),
    ("not yaml", "model: {arch: [vanilla\n", "is not valid YAML"),
    (
        "offload without checkpointing",
        GOOD + "parallel: {offload_activations: true}\n",
        "parallel.offload_activations: needs parallel.activation_checkpointing: true",
    ),
    # Each architecture's own fields (msllm/models/<arch>/config.py) belong to it alone.
    (
        "another arch's field",
        GOOD.replace("n_heads: 4", "n_heads: 4\n  retina_levels: 2"),
        "model.retina_levels is for retina only, not bottom_up "
        "(bottom_up's own fields: final_layers, aggregation, residual_proj, stage_norms)",
    ),
    (
        "unknown model key names the arch",
        GOOD.replace("n_heads: 4", "n_heads: 4\n  final_layer: 2"),
        "unknown key model.final_layer for arch bottom_up (did you mean model.final_layers?)",
    ),
    (
        "own field checked",
        GOOD.replace("n_heads: 4", "n_heads: 4\n  final_layers: -1"),
        "model.final_layers: must not be negative, got -1",
    ),
    (
        "retina factor",
        "model: {arch: retina, n_heads: 4, retina_factor: 1, scales: [{window: 8}]}\ndata: {seq_len: 72}\n",
        "model.retina_factor: must be at least 2, got 1",
    ),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_bad_recipe_is_rejected_with_one_clear_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert expected in message
    assert message.startswith(str(path))
    assert "\n" not in message


def test_a_saved_recipe_with_every_architectures_fields_at_their_defaults_still_loads(tmp_path):
    """Run folders and exports written before each architecture had its own fields hold all of them
    (their defaults) in the model section: they load, and resolve to the recipe of today."""
    recipe = load_recipe(write(tmp_path, GOOD))
    old = recipe.to_dict()
    old["model"].update(retina_levels=3, retina_factor=4)  # retina's defaults, in a bottom_up recipe
    from msllm.config import from_dict

    assert from_dict(old) == recipe
    assert "retina_levels" not in recipe.to_dict()["model"]


def test_show_config_shows_only_the_chosen_architectures_fields(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    shown = recipe.to_display_yaml()
    assert "final_layers: 1" in shown and "aggregation: sum" in shown
    assert "retina" not in shown
    retina = load_recipe(write(tmp_path, "model: {arch: retina, n_heads: 4, scales: [{window: 8}]}\n", "retina.yaml"))
    shown = retina.to_display_yaml()
    assert "retina_levels: 3" in shown and "final_layers" not in shown and "aggregation" not in shown
    assert load_recipe(write(tmp_path, shown, "shown.yaml")) == retina


def test_base_cycle_and_missing_base_are_reported(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match=r"`base:` chain has a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path, "base: nowhere.yaml\n", "c.yaml")
    with pytest.raises(RecipeError, match=r"c.yaml: base recipe file not found: .*nowhere.yaml"):
        load_recipe(tmp_path / "c.yaml")


def test_bad_overrides_are_rejected(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(RecipeError, match="--set train: expected section.key=value"):
        load_recipe(path, ["train"])
    with pytest.raises(RecipeError, match=r"unknown key train.lrr \(did you mean train.lr\?\)"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="train.lr: expected a number, got str 'fast'"):
        load_recipe(path, ["train.lr=fast"])


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) > 50
    undocumented = [key for key, _, _, help in rows if len(help) < 10]
    assert not undocumented


def test_cli_prints_one_line_and_exits_2_on_a_bad_recipe(tmp_path):
    path = write(tmp_path, GOOD.replace("n_heads: 4", "n_heads: 3"))
    result = msllm("show-config", path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not divisible by n_heads 3" in result.stderr
    ok = check(msllm("show-config", write(tmp_path, GOOD, "ok.yaml"), "--set", "train.lr=0.5"))
    assert "lr: 0.5" in ok.stdout and "arch: bottom_up" in ok.stdout
