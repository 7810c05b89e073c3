"""`python -m lab bytes`: real (tiny) runs of its four models, resumability, the verdict."""

import argparse
import json
from pathlib import Path

import pytest

from lab import bytes as bench
from lab import paper

RECIPES = Path(__file__).resolve().parents[2] / "lab" / "recipes" / "bytes"


def summary(bpb: list[float], **extra) -> dict:
    import statistics

    return {"bpb_mean": statistics.mean(bpb), "bpb_sd": statistics.stdev(bpb), "seeds": len(bpb), **extra}


def test_the_verdict_weighs_dynamic_against_fixed_by_the_seed_spread():
    fixed = summary([2.00, 2.01, 1.99], flops_per_byte=10e6)
    dynamic = dict(compression=3.9, target_ratio=4.0, flops_per_byte=10.5e6)
    better = {bench.FIXED: fixed, bench.DYNAMIC: summary([1.90, 1.91, 1.89], **dynamic)}
    noise = {bench.FIXED: fixed, bench.DYNAMIC: summary([1.995, 2.012, 1.985], **dynamic)}
    worse = {bench.FIXED: fixed, bench.DYNAMIC: summary([2.10, 2.11, 2.09], **dynamic)}
    assert bench.verdict(better)[0].startswith("- Does learned chunking beat fixed pooling here? **Yes.**")
    assert "-0.1000 bits/byte (12.2 standard errors" in bench.verdict(better)[0]
    assert "**Not measurably.**" in bench.verdict(noise)[0]
    assert "**No, it is worse.**" in bench.verdict(worse)[0]
    assert "realised compression 3.90 (target 4), FLOPs/byte 1.05x" in bench.verdict(better)[0]


@pytest.mark.slow
def test_bench_bytes_trains_every_model_and_seed_and_skips_finished_runs(tmp_path, monkeypatch):
    # The recipes' shards folders are relative to `root`: they are written here.
    args = argparse.Namespace(
        recipes=str(RECIPES),
        seeds=(1, 2),
        runs=str(tmp_path / "runs"),
        out=str(tmp_path / "out"),
        root=str(tmp_path),
        jobs=2,
        set=["train.max_steps=4", "eval.every=2", "eval.max_batches=1", "log.every=1"],
    )
    text = bench.bench_bytes(args)
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json")}
    assert sorted(results) == sorted(f"{m}-seed{s}" for m in bench.MODELS for s in (1, 2))
    assert results["vanilla-bpe-seed1"]["bits_per_byte"] != results["vanilla-bpe-seed2"]["bits_per_byte"]
    dynamic = results["bottom_up-bytes-dynamic-seed1"]
    assert dynamic["compression"] >= 1.0 and sum(dynamic["chunk_lengths"].values()) > 0
    assert "compression" not in results["bottom_up-bytes-fixed-seed1"]
    for model in bench.MODELS:
        assert text.count(f"| {model} |") == 1
    assert "Does learned chunking beat fixed pooling here?" in text
    assert (tmp_path / "out" / "bytes-bpb.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "bytes-chunks.png").stat().st_size > 10_000

    # A second run trains nothing: it reads the saved results (no subprocess may start).
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(paper.subprocess, "run", no_training)
    assert bench.bench_bytes(args) == text
