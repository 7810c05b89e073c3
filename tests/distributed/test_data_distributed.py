"""The loader under torchrun with 2 ranks (gloo): data-parallel and sequence-parallel reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.launch import torchrun
from msllm.data import build_dataloader

SCRIPT = Path(__file__).parent / "data_torchrun_script.py"


def _windows(batch: dict) -> list[tuple]:
    """Whole samples (inputs and the last label) of a batch, as hashable rows."""
    return [tuple(ids + labels[-1:]) for ids, labels in zip(batch["input_ids"], batch["labels"])]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_data_parallel_and_sequence_parallel(data_small_corpus, tmp_path):
    cfg, _ = data_small_corpus
    done = torchrun(2, SCRIPT, cfg.shards_dir, cfg.seq_len, tmp_path / "out", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]

    # Every train and validation sample, read in this single process without any env.
    all_train = {
        w
        for b in build_dataloader(cfg, "train", batch_size=8, seed=0, shuffle=False, repeat=False)
        for w in _windows({k: v.tolist() for k, v in b.items()})
    }
    all_validation = [
        w
        for b in build_dataloader(cfg, "validation", batch_size=8, seed=0)
        for w in _windows({k: v.tolist() for k, v in b.items()})
    ]

    # Data parallel: disjoint samples, all of them real train samples; exact resume on each rank.
    dp = [{w for b in r["dp"] for w in _windows(b)} for r in ranks]
    assert len(dp[0]) == len(dp[1]) == 12
    assert not dp[0] & dp[1]
    assert dp[0] | dp[1] <= all_train
    for r in ranks:
        assert r["dp_resumed_next"] == r["dp_next"]
        assert r["dp_state"]["sample_in_epoch"] == 24  # 3 batches x 4 samples x 2 ranks

    # Validation: each rank its share, together the whole split (streaming pads to equal shares).
    shares = [[w for b in r["validation"] for w in _windows(b)] for r in ranks]
    assert len(shares[0]) == len(shares[1]) >= len(all_validation) // 2
    assert set(shares[0]) | set(shares[1]) == set(all_validation)

    # Sequence parallel (sp=2): both ranks read the same samples; rank r holds the r-th half. The
    # group reads exactly what one process (sp=1) reads with the same seed, so losses can match.
    half = cfg.seq_len // 2
    single = iter(build_dataloader(cfg, "train", batch_size=4, seed=5))
    for b0, b1 in zip(ranks[0]["sp"], ranks[1]["sp"]):
        inputs = torch.cat([torch.tensor(b0["input_ids"]), torch.tensor(b1["input_ids"])], dim=1)
        labels = torch.cat([torch.tensor(b0["labels"]), torch.tensor(b1["labels"])], dim=1)
        assert len(b0["input_ids"][0]) == len(b1["input_ids"][0]) == half
        assert torch.equal(inputs[:, 1:], labels[:, :-1])
        assert set(_windows({"input_ids": inputs.tolist(), "labels": labels.tolist()})) <= all_train
        expected = next(single)
        assert torch.equal(inputs, expected["input_ids"]) and torch.equal(labels, expected["labels"])
    for r in ranks:
        assert r["sp_state"]["sample_in_epoch"] == 12  # one group: 3 batches x 4 samples
