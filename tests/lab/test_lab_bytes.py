"""`python -m lab bytes`: real (tiny) runs of its models, resumability, the verdict."""

import argparse
import json
from pathlib import Path

import pytest

from lab import bytes as bench
from lab import paper

RECIPES = Path(__file__).resolve().parents[2] / "lab" / "recipes" / "bytes"


HNET_FAMILY = ["attention", True, True, 1.0, [2.0, 1.0]]
PLAIN_FAMILY = ["attention", False, False, 0.02, [1.0, 1.0]]


def summary(bpb: list[float], boundaries=None, compression=None, target_ratio=None, **extra) -> dict:
    import statistics

    return {
        "bpb_mean": statistics.mean(bpb),
        "bpb_sd": statistics.stdev(bpb),
        "seeds": len(bpb),
        "flops_per_byte": 10e6,
        "boundaries": boundaries,
        "compression": compression,
        "target_ratio": target_ratio,
        "router": {},
        "family": HNET_FAMILY,
        "mixer": "attention",
        **extra,
    }


def learned(bpb: list[float], compression: float, **extra) -> dict:
    return summary(bpb, "learned", compression, 4.0, **extra)


def test_the_verdict_weighs_dynamic_against_fixed_by_the_seed_spread():
    fixed = summary([2.00, 2.01, 1.99])
    dynamic = dict(compression=3.9, flops_per_byte=10.5e6)
    better = {bench.FIXED: fixed, bench.DYNAMIC: learned([1.90, 1.91, 1.89], **dynamic)}
    noise = {bench.FIXED: fixed, bench.DYNAMIC: learned([1.995, 2.012, 1.985], **dynamic)}
    worse = {bench.FIXED: fixed, bench.DYNAMIC: learned([2.10, 2.11, 2.09], **dynamic)}

    def pooling(models):
        return next(line for line in bench.verdict(models) if line.startswith("- Does learned chunking beat fixed"))

    assert pooling(better).startswith("- Does learned chunking beat fixed pooling here? **Yes.**")
    assert "-0.1000 bits/byte (12.2 standard errors" in pooling(better)
    assert "**Not measurably.**" in pooling(noise)
    assert "**No, it is worse.**" in pooling(worse)
    assert "realised compression 3.90 (target 4), FLOPs/byte 1.05x" in pooling(better)


def test_the_verdict_asks_each_question_of_the_pair_that_differs_in_it():
    """Learned against fixed boundaries (with the equal-compression comparison, interpolated between
    the fixed-boundary models at 3 and 4), the ingredients, Mamba-2, the code path, the word starts."""
    models = {
        bench.FIXED: summary([2.00, 2.01, 1.99]),
        "bottom_up-bytes-fixed-boundaries": summary([1.98, 1.99, 1.97], "fixed", 4.0, 4.0),
        "bottom_up-bytes-fixed-boundaries-3": summary([1.90, 1.91, 1.89], "fixed", 3.0, 3.0),
        "bottom_up-bytes-fixed-boundaries-plain": summary([2.05, 2.06, 2.04], "fixed", 4.0, 4.0, family=PLAIN_FAMILY),
        bench.DYNAMIC: learned([2.10, 2.11, 2.09], 3.5, family=PLAIN_FAMILY),
        bench.HNET: learned(
            [1.95, 1.96, 1.94],
            3.5,
            router={
                "word_start_boundaries": (0.30, 0.01),
                "word_start_rate": (0.16, 0.0),
                "p_near_threshold": (0.05, 0.01),
                "p_std": (0.3, 0.01),
            },
        ),
        bench.HNET_MAMBA2: learned([1.95, 1.97, 1.93], 3.5, mixer="mamba2"),
        f"{bench.DYNAMIC}+embed_init": learned([2.20, 2.21, 2.19], 3.5),
    }
    lines = bench.verdict(models)
    # each learned model against the fixed-boundary model of its family (mixer, ingredients) at its target ratio
    twins = [line for line in lines if line.startswith("- Do learned boundaries beat fixed ones")]
    assert f"**No, it is worse.** {bench.DYNAMIC} is **worse** than bottom_up-bytes-fixed-boundaries-plain" in twins[0]
    assert f"**Yes.** {bench.HNET} is **better** than bottom_up-bytes-fixed-boundaries:" in twins[1]
    # at 3.5: halfway between 1.90 (every 3) and 1.98 (every 4) = 1.94, so hnet's 1.95 is within noise
    hnet_equal = next(line for line in lines if line.startswith(f"- At equal compression (3.50), {bench.HNET}"))
    assert "**within noise** of fixed boundaries there" in hnet_equal and "interpolated: 1.9400" in hnet_equal
    # the plain family has one fixed-boundary model only: nothing to interpolate between
    assert f"- {bench.DYNAMIC} realised compression 3.50: no two fixed-boundary models of its family" in "\n".join(
        lines
    )
    assert any(line.startswith("- Do H-Net's training ingredients help learned chunking? **Yes.**") for line in lines)
    assert any(line.startswith("- Do Mamba-2 outer stages help? **Not measurably.**") for line in lines)
    assert any(line.startswith("- Does embed_init alone help learned chunking? **No, it is worse.**") for line in lines)
    assert any(
        line.startswith("- Does dynamic chunking's code path with fixed boundaries beat mean pooling?")
        for line in lines
    )
    # fixed pooling is judged against models of its own mixer only
    assert not any(f"{bench.HNET_MAMBA2} is" in line and bench.FIXED + ":" in line for line in lines)
    assert any(f"{bench.HNET} is **better** than {bench.FIXED}:" in line for line in lines)
    words = next(line for line in lines if line.startswith(f"- Did {bench.HNET}'s boundaries learn"))
    assert (
        "30.0% ± 1.0% of its boundaries fall at a word start, **more often than** random boundaries would (16.0%)"
        in words
    )


def test_equal_compression_is_not_extrapolated():
    models = {
        "bottom_up-bytes-fixed-boundaries": summary([1.98, 1.99, 1.97], "fixed", 4.0, 4.0),
        "bottom_up-bytes-fixed-boundaries-3": summary([1.90, 1.91, 1.89], "fixed", 3.0, 3.0),
    }
    assert bench.at_compression(models, 2.5) is None and bench.at_compression(models, 4.2) is None
    assert bench.at_compression(models, 3.0)["bpb_mean"] == pytest.approx(1.90)


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
    assert [row[0] for row in dynamic["router"]] == [1, 2, 3, 4]  # the router's diagnostics at every step
    assert "compression" not in results["bottom_up-bytes-fixed-seed1"]
    # fixed boundaries: every chunk of the trained model is 4 bytes long
    assert set(results["bottom_up-bytes-fixed-boundaries-seed1"]["chunk_lengths"]) == {"4"}
    for model in bench.MODELS:
        assert text.count(f"| {model} |") == 1
    assert "Does learned chunking beat fixed pooling here?" in text
    assert (tmp_path / "out" / "bytes-bpb.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "bytes-chunks.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "bytes-router.png").stat().st_size > 10_000

    # A second run trains nothing: it reads the saved results (no subprocess may start).
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(paper.subprocess, "run", no_training)
    assert bench.bench_bytes(args) == text


def test_models_picks_the_recipes_to_train(tmp_path):
    from lab.__main__ import build_parser
    from msllm.errors import MsllmError

    def grid(*argv):
        args = build_parser().parse_args(["bytes", *argv])
        return paper.SeedGrid.from_args(args, "bytes", RECIPES, tmp_path, bench.MODELS)

    assert grid().models == bench.MODELS
    assert grid("--models", "bottom_up-bytes-fixed", "vanilla-bytes-local").models == (
        "bottom_up-bytes-fixed",
        "vanilla-bytes-local",
    )
    with pytest.raises(MsllmError, match=r"no recipe .*nope\.yaml \(pass --recipes DIR"):
        grid("--models", "nope")
