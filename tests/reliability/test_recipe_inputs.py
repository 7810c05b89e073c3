"""Issue 19, items 5, 6 and 7: recipes and values that used to end in a traceback, a MemoryError or
a message from deep inside a library are one line (exit 2) before anything starts."""

from __future__ import annotations

import time

import pytest

from fixtures.reliability import cli, one_line
from fixtures.train import check, make_recipe, msllm, rows
from msllm.config import MAX_RECIPE_DEPTH, MAX_RECIPE_VALUES


def _alias_bomb(levels: int) -> str:
    """A flow list of anchors of 9 aliases each, `levels` deep: 9**levels values once expanded,
    one line of YAML."""
    anchors = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    anchors += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(anchors) + "]"


def _recipe_with_max_steps(tmp_path, tiny_data, max_steps_yaml: str):
    recipe, _ = make_recipe(tmp_path, tiny_data)
    recipe.write_text(recipe.read_text().replace("max_steps: 12", f"max_steps: {max_steps_yaml}"))
    return recipe


def test_alias_bomb_under_max_steps_is_refused_at_once(tmp_path, tiny_data, capsys):
    """9 levels: 430 million values. Expanded by the error message, it was gigabytes and a MemoryError."""
    recipe = _recipe_with_max_steps(tmp_path, tiny_data, _alias_bomb(9))
    started = time.perf_counter()
    code, _, err = cli(capsys, "show-config", recipe)
    line = one_line(code, err, "show-config")
    assert f"{recipe}: the YAML expands to more than {MAX_RECIPE_VALUES:,} values (aliases repeated)" in line
    assert time.perf_counter() - started < 10 and len(err) < 400


def test_a_bad_value_is_shown_in_one_short_line(tmp_path, tiny_data, capsys):
    """Under the size bound (9**4 values) the recipe loads; the error shows the value's start only."""
    recipe = _recipe_with_max_steps(tmp_path, tiny_data, _alias_bomb(4))
    code, _, err = cli(capsys, "show-config", recipe)
    line = one_line(code, err, "show-config")
    prefix = f"msllm show-config: error: {recipe}: train.max_steps: expected an integer, got list [['lol', 'lol',"
    assert line.startswith(prefix) and len(line) <= len(prefix) + 100


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("[" * 20000 + "]" * 20000, f"YAML nested more than {MAX_RECIPE_DEPTH} levels deep"),
        (
            "train:\n  max_steps: " + "{a: " * 20000 + "1" + "}" * 20000,
            f"YAML nested more than {MAX_RECIPE_DEPTH} levels",
        ),
        ("a: &a [1, *a]\n", "a YAML anchor contains an alias of itself"),
        ("train:\n  max_steps: " + "9" * 5000 + "\n", "a YAML value that cannot be read: Exceeds the limit"),
    ],
    ids=["20000 deep", "20000 deep under max_steps", "self-alias", "5000-digit integer"],
)
def test_yaml_that_exhausts_the_parser_is_one_line(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    code, _, err = cli(capsys, "show-config", path)
    assert message in one_line(code, err, "show-config")


def test_deep_nesting_through_aliases_is_bounded(tmp_path, capsys):
    """Each anchor a level deeper than the one it aliases: shallow to compose, 200 deep once expanded."""
    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 200)]
    path = tmp_path / "r.yaml"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = cli(capsys, "show-config", path)
    assert "nested more than 64 levels deep (aliases expanded)" in one_line(code, err, "show-config")


@pytest.mark.parametrize("which", ["recipe", "base"])
def test_recipe_that_is_not_utf8_is_one_line(tmp_path, tiny_data, capsys, which):
    recipe, _ = make_recipe(tmp_path, tiny_data)
    latin1 = "run:\n  name: caf\xe9\n".encode("latin-1")
    if which == "recipe":
        recipe.write_bytes(latin1 + recipe.read_bytes())
        bad = recipe
    else:
        bad = tmp_path / "base.yaml"
        bad.write_bytes(latin1)
        recipe.write_text("base: base.yaml\n" + recipe.read_text())
    code, _, err = cli(capsys, "show-config", recipe)
    line = one_line(code, err, "show-config")
    assert f"{bad}: not UTF-8 text (byte 0xe9 at offset {latin1.index(0xE9)}): save the recipe as UTF-8" in line


@pytest.mark.parametrize("command", ["show-config", "train"])
@pytest.mark.parametrize(
    "seed, message",
    [
        (2**64 + 1, "run.seed: int 18446744073709551617 is out of range"),
        (2**63, "run.seed: int 9223372036854775808 is out of range (at most 2**63-1"),
        (-1, "run.seed: must be in [0, 2**63), got -1"),
    ],
)
def test_seed_out_of_range_is_refused_by_every_command(tmp_path, tiny_data, capsys, command, seed, message):
    recipe, out = make_recipe(tmp_path, tiny_data)
    code, _, err = cli(capsys, command, recipe, "--set", f"run.seed={seed}")
    assert message in one_line(code, err, command)
    assert not out.exists()


@pytest.mark.slow
def test_the_largest_seed_trains(tmp_path, tiny_data):
    """2**63 - 1 is accepted because torch, numpy and streaming all take it (with the per-rank offset)."""
    recipe, out = make_recipe(
        tmp_path, tiny_data, train={"max_steps": 2}, eval={"every": 0, "max_batches": 1}, checkpoint={"every": 0}
    )
    check(msllm("train", recipe, "--set", f"run.seed={2**63 - 1}"))
    assert [r["step"] for r in rows(out)] == [1, 2]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.shard_size_limit=-5",
            "data.shard_size_limit: must hold one sample of seq_len+1 int32 tokens (260 bytes)",
        ),
        ("data.shard_size_limit=0", "and stay below 2**32 (mosaicml-streaming's limit), got 0"),
        ("data.shard_size_limit=4294967296", "got 4,294,967,296"),
        (
            "data.tokenizer.vocab_size=1",
            "data.tokenizer.vocab_size: 1 is too small: a tokenizer needs its 4 special pieces "
            "and 256 byte pieces (byte_fallback) plus one piece per character of the corpus; "
            "set data.tokenizer.vocab_size to 260 or more",
        ),
        ("data.seq_len=1000000000000", "data.seq_len: at most 16,777,216 (2**24) tokens, got 1,000,000,000,000"),
        (
            "data.tokenizer.character_coverage=0.5",
            "data.tokenizer.character_coverage: must be between 0.98 and 1, got 0.5",
        ),
        ("data.tokenizer.input_sentence_size=-5", "data.tokenizer.input_sentence_size: must not be negative, got -5"),
    ],
)
def test_data_values_refused_before_prep(tmp_path, tiny_data, capsys, override, message):
    recipe, _ = make_recipe(tmp_path, tiny_data)
    shards = tmp_path / "new_shards"
    code, _, err = cli(capsys, "prep", recipe, "--set", f"data.shards_dir={shards}", "--set", override)
    assert message in one_line(code, err, "prep")
    assert not shards.exists() and not (tmp_path / ".new_shards.partial").exists()


def test_sentencepiece_errors_past_validation_are_one_line(tmp_path, tiny_data):
    """Called from code, without a recipe's validation: sentencepiece's RuntimeError and ValueError
    (here "cannot parse -5 as int", once a traceback) are one DataError line."""
    from msllm.config import DataConfig, TokenizerConfig
    from msllm.data import prepare_dataset
    from msllm.errors import DataError

    for tokenizer, message in (
        (TokenizerConfig(vocab_size=320, input_sentence_size=-5), "cannot parse"),
        (TokenizerConfig(vocab_size=2), "INTERNAL"),
    ):
        cfg = DataConfig(
            source="text",
            paths=[str(tiny_data[0])],
            split_on_blank_lines=True,
            seq_len=64,
            workers=1,
            shards_dir=str(tmp_path / "s"),
            tokenizer=tokenizer,
        )
        with pytest.raises(DataError) as caught:
            prepare_dataset(cfg, quiet=True)
        line = str(caught.value)
        assert line.startswith("sentencepiece could not train the tokenizer: ") and message in line and "\n" not in line


def test_vocab_size_above_the_floor_names_the_corpus_minimum(tmp_path, tiny_data, capsys):
    """The floor (260) is what any corpus needs; prep then names this corpus's exact minimum."""
    recipe, _ = make_recipe(tmp_path, tiny_data)
    code, _, err = cli(
        capsys, "prep", recipe, "--set", f"data.shards_dir={tmp_path / 's'}", "--set", "data.tokenizer.vocab_size=260"
    )
    line = one_line(code, err, "prep")
    assert "data.tokenizer.vocab_size 260 is too small: this corpus needs at least 286 pieces" in line
    code, _, _ = cli(
        capsys, "prep", recipe, "--set", f"data.shards_dir={tmp_path / 's'}", "--set", "data.tokenizer.vocab_size=286"
    )
    assert code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "1000000000000"], "--seq-len: must be between 1 and 16,777,216 (2**24), got 1,000,000,000,000"),
        (["--set", "data.seq_len=1000000000000"], "data.seq_len: at most 16,777,216 (2**24) tokens"),
        (["--seq-len", str(2**24)], "measuring on samples of 16,777,216 tokens needs about "),
        (
            ["--seq-len", str(2**24), "--measure-len", str(2**22)],
            "measuring on samples of 4,194,304 tokens needs about ",
        ),
    ],
)
def test_inspect_at_an_impossible_length_is_one_line(tmp_path, tiny_data, capsys, monkeypatch, args, message):
    monkeypatch.setattr("msllm.inspect.available_bytes", lambda device: 256 << 20)  # any machine: 256 MiB free
    recipe, _ = make_recipe(tmp_path, tiny_data)
    code, _, err = cli(capsys, "inspect", recipe, *args)
    line = one_line(code, err, "inspect")
    assert message in line
    if "measuring" in message:
        assert "but this machine has 0.2 GiB available: pass --measure-len " in line and "or --no-measure" in line
        fits = int(line.split("--measure-len ")[1].split()[0])
        code, out, err = cli(capsys, "inspect", recipe, *args[:2], "--measure-len", fits)
        assert code == 0 and f"measured at {fits:,} tokens and extended linearly" in out, err
