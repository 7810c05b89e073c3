"""Issue 19, items 6 and 7 (data side): corpora, shards and disks that used to end in a traceback or
an unclear line are one line naming the file (exit 2), and nothing already written is changed."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess

import pytest

from fixtures.reliability import cli, one_line, one_line_error, tree_digest
from fixtures.train import corpus_text, make_recipe, msllm


def _prep(capsys, recipe, *overrides):
    args = ["prep", recipe]
    for item in overrides:
        args += ["--set", item]
    return cli(capsys, *args)


def test_jsonl_record_nested_100000_deep(tmp_path, tiny_data, capsys):
    corpus = tmp_path / "deep.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    recipe, _ = make_recipe(tmp_path, tiny_data)
    code, _, err = _prep(
        capsys, recipe, "data.source=jsonl", f"data.paths=[{corpus}]", f"data.shards_dir={tmp_path / 's'}"
    )
    assert f"{corpus}:2: JSON nested too deeply to read" in one_line(code, err, "prep")


@pytest.mark.parametrize(
    "source, name", [("jsonl", "corpus.jsonl.gz"), ("text", "corpus.txt.gz"), ("jsonl", "corpus.jsonl.zst")]
)
def test_truncated_compressed_corpus_names_the_file(tmp_path, tiny_data, capsys, source, name):
    text = corpus_text()
    raw = ("".join(json.dumps({"text": t}) + "\n" for t in text.split("\n\n")) if source == "jsonl" else text).encode()
    if name.endswith(".gz"):
        packed = gzip.compress(raw)
    else:
        import zstandard

        packed = zstandard.ZstdCompressor().compress(raw)
    corpus = tmp_path / name
    corpus.write_bytes(packed[: len(packed) // 2])
    recipe, _ = make_recipe(tmp_path, tiny_data)
    code, _, err = _prep(
        capsys, recipe, f"data.source={source}", f"data.paths=[{corpus}]", f"data.shards_dir={tmp_path / 's'}"
    )
    line = one_line(code, err, "prep")
    assert f"{corpus}: cannot decompress it, it is truncated or corrupt (" in line and "fix or replace the file" in line
    assert not (tmp_path / "s").exists()


def test_gzip_text_corpus_is_read_decompressed(tmp_path, tiny_data, capsys):
    """Text files are decompressed by their suffix as jsonl files are: a .txt.gz corpus gives the
    same shards as the plain text."""
    plain, packed = tmp_path / "corpus.txt", tmp_path / "corpus.txt.gz"
    plain.write_text(corpus_text())
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    recipe, _ = make_recipe(tmp_path, tiny_data)
    for corpus, shards in ((plain, "a"), (packed, "b")):
        code, _, err = _prep(capsys, recipe, f"data.paths=[{corpus}]", f"data.shards_dir={tmp_path / shards}")
        assert code == 0, err
    digest_a, digest_b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert {k: v for k, v in digest_a.items() if k != "manifest.json"} == {
        k: v for k, v in digest_b.items() if k != "manifest.json"
    }


def test_corpus_glob_over_the_shards_folder_reruns_and_forces(tmp_path, tiny_data, capsys):
    """`data.paths: [project/**]` with the shards in project/shards: the glob skips what msllm writes,
    so the identical rerun is up to date and --force rebuilds the same shards."""
    project = tmp_path / "project"
    (project / "text").mkdir(parents=True)
    (project / "text" / "corpus.txt").write_text(corpus_text())
    recipe, _ = make_recipe(tmp_path, tiny_data)
    overrides = (
        f"data.paths=['{project}/**']",
        f"data.shards_dir={project / 'shards'}",
        f"data.cache_dir={project / 'cache'}",
    )
    code, _, err = _prep(capsys, recipe, *overrides)
    assert code == 0, err
    first = tree_digest(project / "shards")
    manifest = json.loads((project / "shards" / "manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(project / "text" / "corpus.txt")]

    code, out, err = _prep(capsys, recipe, *overrides)
    assert code == 0 and "is up to date" in out, err
    code, out, err = _prep(capsys, recipe, *overrides)  # the cache folder exists by now: still skipped
    assert code == 0 and "is up to date" in out, err
    code, _, err = cli(capsys, "prep", recipe, "--force", *[a for o in overrides for a in ("--set", o)])
    assert code == 0, err
    assert {k: v for k, v in tree_digest(project / "shards").items() if k != "manifest.json"} == {
        k: v for k, v in first.items() if k != "manifest.json"
    }


def test_a_corpus_path_inside_the_shards_folder_is_refused(tmp_path, tiny_data, capsys):
    _, shards = tiny_data
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    before = tree_digest(copy)
    recipe, _ = make_recipe(tmp_path, tiny_data)
    code, _, err = cli(
        capsys,
        "prep",
        recipe,
        "--force",
        "--set",
        f"data.paths=[{copy / 'tokenizer.model'}]",
        "--set",
        f"data.shards_dir={copy}",
    )
    line = one_line(code, err, "prep")
    assert f"data.paths: {copy / 'tokenizer.model'} is inside {copy}, which msllm writes" in line
    assert tree_digest(copy) == before


@pytest.mark.needs_root("mounts a 256 kB tmpfs")
def test_full_disk_during_prep_names_the_folder_and_keeps_the_old_dataset(tmp_path, tiny_data, capsys):
    """A tmpfs that holds the old dataset and 16 kB more: --force with other settings runs out of
    space, names where it writes, and the complete dataset there is unchanged."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        shards = disk / "shards"
        shutil.copytree(tiny_data[1], shards)
        with open(disk / "filler", "wb") as filler:  # leave 16 kB free
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            filler.write(b"\0" * (free - (16 << 10)))
        before = tree_digest(shards)
        recipe, _ = make_recipe(tmp_path, tiny_data)
        code, _, err = cli(
            capsys,
            "prep",
            recipe,
            "--force",
            "--set",
            f"data.shards_dir={shards}",
            "--set",
            "data.tokenizer.vocab_size=300",
        )
        line = one_line(code, err, "prep")
        assert f"cannot write the dataset in {disk / '.shards.partial'}: No space left on device" in line
        assert "free space there or set data.shards_dir elsewhere" in line
        assert tree_digest(shards) == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("field, value", [("vocab_size", 100), ("vocab_size", 4000), ("eos_id", 7)])
def test_manifest_that_disagrees_with_its_tokenizer(tmp_path, tiny_data, trained_run, capsys, field, value):
    """An edited vocab_size used to build a smaller embedding and fail with an IndexError mid-step."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data[1], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    actual = manifest[field]
    manifest[field] = value
    (shards / "manifest.json").write_text(json.dumps(manifest))
    before = tree_digest(shards)
    recipe, run = trained_run
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", run, "--set", f"data.shards_dir={shards}")
    line = one_line(code, err, "eval")
    assert (
        f"{shards}/manifest.json says {field} {value} but its tokenizer.model has {actual} (the manifest was edited)"
        in line
    )
    assert tree_digest(shards) == before


def test_manifest_vocab_size_edited_before_training(tmp_path, tiny_data):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data[1], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["vocab_size"] = 100
    (shards / "manifest.json").write_text(json.dumps(manifest))
    recipe, out = make_recipe(tmp_path, tiny_data, model={"vocab_size": 0})
    proc = msllm("train", recipe, "--set", f"data.shards_dir={shards}", "--set", "data.source=shards")
    assert "says vocab_size 100 but its tokenizer.model has 320" in one_line_error(proc, "train")
    assert not (out / "checkpoints").exists()


def test_a_bad_recipe_for_train_is_exactly_one_stderr_line(tmp_path, tiny_data):
    """Torch's "No CUDA runtime is found" warning (logged when DeepSpeed loads on a machine with a
    CUDA toolkit and no GPU) no longer comes before the error."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not shards\n")
    recipe, _ = make_recipe(tmp_path, tiny_data)
    proc = msllm("train", recipe, "--set", f"data.shards_dir={junk}")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [one_line_error(proc, "train")], proc.stderr


@pytest.mark.parametrize("tokenizer", ["bytes", "unigram"])
def test_a_lone_surrogate_in_a_jsonl_corpus_is_one_line(tmp_path, tiny_data, capsys, tokenizer):
    """Probe class: byte-level data (a jsonl record whose text holds a lone surrogate, "\\ud800", which
    json.loads accepts and UTF-8 cannot encode). It was a UnicodeEncodeError traceback in the split's
    hash or the byte tokenizer; now it is one line naming the file and line, and no dataset is made;
    with data.on_decode_error: skip the record is skipped and counted."""
    corpus = tmp_path / "corpus.jsonl"
    records = [json.dumps({"text": t}) for t in corpus_text().split("\n\n")]
    records.insert(3, '{"text": "a lone \\ud800 surrogate"}')
    corpus.write_text("\n".join(records) + "\n")
    recipe, _ = make_recipe(tmp_path, tiny_data)
    shards = tmp_path / "s"
    overrides = ["data.source=jsonl", f"data.paths=[{corpus}]", f"data.shards_dir={shards}"]
    overrides.append(f"data.tokenizer.type={tokenizer}")
    code, _, err = _prep(capsys, recipe, *overrides)
    line = one_line(code, err, "prep")
    assert f"{corpus}:4: a lone surrogate (\\ud800) in field 'text', which UTF-8 cannot encode; fix the file" in line
    assert "or set data.on_decode_error: skip" in line
    assert not shards.exists() and not list(tmp_path.rglob("manifest.json"))  # no dataset, whole or in part

    code, out, err = _prep(capsys, recipe, *overrides, "data.on_decode_error=skip")
    assert code == 0, err
    assert f"skipped 1 document(s) with a lone surrogate: {corpus} (1)" in out
    assert (shards / "manifest.json").is_file()


def test_surrogate_bytes_in_a_text_corpus_are_one_line(tmp_path, tiny_data, capsys):
    """Probe class: byte-level data (a text corpus holding a surrogate encoded as UTF-8 bytes, ED A0 80,
    which strict UTF-8 rejects): one line naming the file, no dataset made."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(corpus_text().encode() + b"\n\na lone \xed\xa0\x80 surrogate\n")
    recipe, _ = make_recipe(tmp_path, tiny_data)
    shards = tmp_path / "s"
    for tokenizer in ("bytes", "unigram"):
        code, _, err = _prep(
            capsys, recipe, f"data.paths=[{corpus}]", f"data.shards_dir={shards}", f"data.tokenizer.type={tokenizer}"
        )
        line = one_line(code, err, "prep")
        assert f"{corpus}: bytes that are not UTF-8; fix the file or set data.on_decode_error: skip" in line
        assert not shards.exists() and not list(tmp_path.rglob("manifest.json"))
