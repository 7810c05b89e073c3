"""Issue 19, items 3, 6, 7 and 8 (training side): the data swapped or deleted under a running
training, an edited meta.json, every checkpoint corrupt, a damaged trainer state, a model too big
for memory, --overwrite of the working directory, MFU above 100%."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fixtures.reliability import checkpoints, cli, one_line, one_line_error, rerecord_checksum, tree_digest
from fixtures.train import check, make_recipe, msllm, rows

# At the start of step 4 (after checkpoint 3), ACTION is done to the run's shards folder.
_AT_STEP_4 = """
import json, shutil
from pathlib import Path
import msllm.train.trainer as trainer_module
_train_step = trainer_module.Trainer.train_step
def train_step(self, batches, plan):
    if plan.step == 4:
        shards = Path(self.recipe.data.shards_dir)
        ACTION
    return _train_step(self, batches, plan)
trainer_module.Trainer.train_step = train_step
"""
# What `msllm prep --force` with another tokenizer leaves: another manifest (and tokenizer).
_SWAP = """manifest = json.loads((shards / "manifest.json").read_text())
        manifest["tokenizer_sha256"] = "0" * 64
        (shards / "manifest.json").write_text(json.dumps(manifest))
        (shards / "tokenizer.model").write_bytes(b"another tokenizer")"""
_DELETE = """shutil.rmtree(shards)"""


def _private_shards(tmp_path, tiny_data):
    corpus, shards = tiny_data
    mine = tmp_path / "shards"
    shutil.copytree(shards, mine)
    return (corpus, mine)


@pytest.mark.slow
def test_shards_swapped_under_a_run_stop_it_and_its_checkpoints_keep_the_old_tokenizer(tmp_path, tiny_data):
    data = _private_shards(tmp_path, tiny_data)
    tokenizer = (data[1] / "tokenizer.model").read_bytes()
    recipe, out = make_recipe(
        tmp_path,
        data,
        train={"max_steps": 9},
        checkpoint={"every": 3, "keep_last": 0},
        eval={"every": 0, "max_batches": 2},
    )
    line = one_line_error(msllm("train", recipe, python_code=_AT_STEP_4.replace("ACTION", _SWAP)), "train")
    assert "the shards in" in line and "changed while this run trained" in line and "prep --force" in line
    assert checkpoints(out) == ["step_0000003"]  # no checkpoint of the new data's step
    assert (out / "checkpoints" / "step_0000003" / "tokenizer.model").read_bytes() == tokenizer


def test_shards_deleted_under_a_run_keep_it_training_and_it_says_so(tmp_path, tiny_data):
    data = _private_shards(tmp_path, tiny_data)
    tokenizer = (data[1] / "tokenizer.model").read_bytes()
    recipe, out = make_recipe(
        tmp_path,
        data,
        train={"max_steps": 9},
        checkpoint={"every": 3, "keep_last": 0},
        eval={"every": 0, "max_batches": 2},
    )
    proc = check(msllm("train", recipe, python_code=_AT_STEP_4.replace("ACTION", _DELETE)))
    notes = [line for line in proc.stdout.splitlines() if "is gone" in line]
    assert len(notes) == 1 and "training goes on" in notes[0]  # said once, though checkpoints 6 and 9 came after
    assert checkpoints(out) == ["step_0000003", "step_0000006", "step_0000009"]
    for step in (6, 9):  # every later checkpoint holds the tokenizer the run started with
        assert (out / "checkpoints" / f"step_{step:07d}" / "tokenizer.model").read_bytes() == tokenizer
    assert rows(out, "eval") == []  # no validation split to evaluate on


def test_an_edited_meta_json_fails_its_checksum(capsys, run_copy):
    recipe, out = run_copy
    meta_file = out / "checkpoints" / "step_0000006" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["zero_stage"] = None
    meta_file.write_text(json.dumps(meta))
    before = tree_digest(out)
    code, _, err = cli(capsys, "export", out, "--out", out.parent / "export")
    line = one_line(code, err, "export")
    assert (
        "step_0000006 is corrupt (meta.json fails its checksum (edited or damaged))" in line and "step_0000003" in line
    )
    assert tree_digest(out) == before
    proc = check(msllm("train", recipe, "--set", "train.max_steps=7"))  # resume sets it aside, keeps it
    assert "meta.json fails its checksum" in proc.stdout and "step_0000003 at step 3" in proc.stdout
    assert "step_0000006.corrupt" in checkpoints(out)


def test_a_trainer_state_without_its_dataloader_entry_falls_back(run_copy):
    recipe, out = run_copy
    path = out / "checkpoints" / "step_0000006" / "trainer_state_rank0.pt"
    state = torch.load(path, weights_only=True)
    del state["dataloader"]
    torch.save(state, path)
    rerecord_checksum(path)  # as one who rewrites the whole folder would
    proc = check(msllm("train", recipe, "--set", "train.max_steps=7"))
    assert "has no dataloader entry" in proc.stdout and "step_0000003 at step 3" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("allowed", [True, False])
def test_every_checkpoint_corrupt_restarts_loudly_or_stops(run_copy, allowed):
    recipe, out = run_copy
    for step in (3, 6):
        (out / "checkpoints" / f"step_{step:07d}" / "mp_rank_00_model_states.pt").write_bytes(b"")
    overrides = ["--set", f"checkpoint.restart_if_all_corrupt={str(allowed).lower()}", "--set", "train.max_steps=1"]
    if allowed:
        proc = check(msllm("train", recipe, *overrides))
        warning = [line for line in proc.stdout.splitlines() if line.startswith("msllm: WARNING")]
        assert len(warning) == 1 and "all 2 checkpoints" in warning[0] and "starts again from step 0" in warning[0]
    else:
        line = one_line_error(msllm("train", recipe, *overrides), "train")
        assert "all 2 checkpoints" in line and "restart_if_all_corrupt is false" in line
    assert {"step_0000003.corrupt", "step_0000006.corrupt"} <= set(checkpoints(out))  # kept, renamed


@pytest.mark.slow
def test_a_model_too_big_for_memory_is_refused_before_anything_is_allocated(tmp_path, tiny_data, capsys):
    from msllm.train.memory import available_bytes

    free = available_bytes(torch.device("cpu"))
    assert free is not None  # Linux: /proc/meminfo
    big = {"d_model": 16384, "n_heads": 64, "scales": [{"factor": 1, "layers": 64, "attention": "full"}]}
    recipe, out = make_recipe(tmp_path, tiny_data, model=big)
    line = one_line_error(msllm("train", recipe), "train")
    assert "the model does not fit" in line and "GiB free" in line
    assert not (out / "checkpoints").exists()
    code, _, err = cli(capsys, "inspect", recipe)
    assert "the model does not fit" in one_line(code, err, "inspect") and "fp32 weights" in err


def test_overwrite_of_the_working_directory_is_refused(tmp_path, tiny_data):
    recipe, _ = make_recipe(tmp_path, tiny_data, run={"output_dir": "."})
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    proc = msllm("train", recipe, "--overwrite", cwd=work)
    line = one_line_error(proc, "train")
    assert "holds the working directory" in line and (work / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("work")) == ["work"]


def test_mfu_above_100_percent_is_never_given():
    from msllm.metrics import MfuMeter

    remeasured = []
    monitor = MfuMeter(flops_per_token=1e6, peak_flops=1e9, world_size=1, remeasure=lambda: remeasured.append(1) or 4e9)
    assert monitor.mfu(2000) == pytest.approx(0.5)  # 2e9 of 4e9 after the re-measurement
    assert remeasured == [1] and monitor.peak_flops == 4e9
    assert monitor.mfu(8000) is None and monitor.peak_unreliable  # still above the peak: unreliable
    assert monitor.mfu(100) is None and remeasured == [1, 1]  # never given again, never measured again
    fixed = MfuMeter(flops_per_token=1e6, peak_flops=1e9, world_size=1, remeasure=None)  # train.peak_flops
    assert fixed.mfu(3000) is None and fixed.peak_unreliable and fixed.mfu(500) is None


def test_an_unreliable_peak_is_shown_as_such_in_the_log_line():
    from msllm.train.callbacks import ConsoleLogger

    printed = []
    row = {
        "kind": "train",
        "step": 1,
        "loss": 1.0,
        "lr": 1e-3,
        "grad_norm": None,
        "tokens_per_s": 1.0,
        "mfu": None,
        "peak_unreliable": True,
        "peak_rss_bytes": 2**30,
        "eta_s": 1.0,
    }
    ConsoleLogger(10, printer=printed.append).on_log(row)
    assert "mfu n/a (peak unreliable)" in printed[0]


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--temperature", "1e-45", "--temperature: 1e-45 is out of range: it must be 0 (greedy) or at least 0.001"),
        ("--seed", str(2**64 + 1), "--seed: 18446744073709551617 is out of range: it must be in [0, 2^63)"),
        ("--top-p", "0", "--top-p: 0.0 is out of range"),
    ],
)
def test_generate_flags_out_of_range_are_one_line(capsys, trained_run, flag, value, expected):
    _, out = trained_run
    code, _, err = cli(capsys, "generate", out, "--prompt", "The", flag, value)
    assert expected in one_line(code, err, "generate")


def test_a_prompt_that_is_not_utf8_is_one_line(trained_run):
    _, out = trained_run
    proc = msllm("generate", out, "--prompt", os.fsdecode(b"caf\xe9"))  # Latin-1 bytes in a UTF-8 locale
    assert "--prompt: not valid UTF-8 text" in one_line_error(proc, "generate")


@pytest.mark.needs_root("mounts a 64 kB tmpfs")
def test_export_onto_a_full_disk_is_one_line_and_leaves_no_temporary_folder(tmp_path, trained_run, capsys):
    import subprocess

    _, out = trained_run
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        code, _, err = cli(capsys, "export", out, "--out", disk / "export")
        line = one_line(code, err, "export")
        assert "could not write the export" in line and "no space left on device" in line and str(disk) in line
        assert list(disk.iterdir()) == []  # no .export.tmp-PID folder left behind
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def exported(tmp_path, trained_run, capsys):
    _, out = trained_run
    dest = tmp_path / "export"
    code, _, err = cli(capsys, "export", out, "--out", dest)
    assert code == 0, err
    return dest


def _spoil_safetensors_header(path):
    """The header claims a tensor twice as long as the bytes that follow it."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + (end - begin)]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda d: (d / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes()[:-1] + b"x"),
            "is not the tokenizer the model was trained with",
        ),
        (lambda d: (d / "export.json").write_text("{not json"), "export.json cannot be read"),
        (
            lambda d: _spoil_safetensors_header(d / "model.safetensors"),
            "model.safetensors is not a readable safetensors file",
        ),
        (lambda d: (d / "recipe.yaml").unlink(), "is not a complete msllm export: recipe.yaml missing"),
    ],
)
def test_a_damaged_export_is_one_line_for_generate_and_eval(exported, trained_run, capsys, damage, expected):
    recipe, _ = trained_run
    damage(exported)
    before = tree_digest(exported)
    code, _, err = cli(capsys, "generate", exported, "--prompt", "The", "--max-new-tokens", "2")
    assert expected in one_line(code, err, "generate")
    code, _, err = cli(capsys, "eval", recipe, "--checkpoint", exported)
    assert expected in one_line(code, err, "eval")
    assert tree_digest(exported) == before


def test_an_export_tokenizer_with_more_tokens_than_the_model_is_refused(exported, tiny_data, tmp_path, capsys):
    import sentencepiece as spm

    corpus, _ = tiny_data
    with open(tmp_path / "big.model", "wb") as f:  # another tokenizer, bigger than the model's 320
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_writer=f, vocab_size=330, minloglevel=2, byte_fallback=True
        )
    (exported / "tokenizer.model").write_bytes((tmp_path / "big.model").read_bytes())
    info = json.loads((exported / "export.json").read_text())
    info["tokenizer_sha256"] = None  # as an export edited by hand would leave it
    (exported / "export.json").write_text(json.dumps(info))
    code, _, err = cli(capsys, "generate", exported, "--prompt", "The")
    assert "more than the model's 320" in one_line(code, err, "generate")
    (exported / "tokenizer.model").write_bytes(b"garbage")
    code, _, err = cli(capsys, "generate", exported, "--prompt", "The")
    assert "is not a sentencepiece model" in one_line(code, err, "generate")
