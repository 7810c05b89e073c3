"""Run by tests/distributed/test_data_distributed.py under torchrun: what each rank's loaders give.

Usage: torchrun --nproc_per_node=2 data_torchrun_script.py SHARDS_DIR SEQ_LEN OUT_PREFIX
Writes OUT_PREFIX.<rank>.json with the batches (as lists) and loader states of this rank.
"""

import json
import sys

import torch.distributed as dist

from msllm.config import DataConfig
from msllm.data import build_dataloader
from msllm.distributed import ParallelDims


def rows(batch):
    return {key: value.tolist() for key, value in batch.items()}


def main() -> None:
    shards_dir, seq_len, out_prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = DataConfig(source="shards", shards_dir=shards_dir, seq_len=seq_len)
    result = {"rank": rank}

    # Data parallel: 2 ranks, each its own samples; then resume from the state after 3 batches.
    train = build_dataloader(cfg, "train", batch_size=4, seed=5)
    stream = iter(train)
    result["dp"] = [rows(next(stream)) for _ in range(3)]
    result["dp_state"] = train.state_dict()
    result["dp_next"] = rows(next(stream))
    resumed = build_dataloader(cfg, "train", batch_size=4, seed=5)
    resumed.load_state_dict(result["dp_state"])
    result["dp_resumed_next"] = rows(next(iter(resumed)))

    # Validation: the whole split, each rank its share.
    result["validation"] = [rows(b) for b in build_dataloader(cfg, "validation", batch_size=4, seed=0)]

    # Sequence parallel: one group of sp=2 (ranks 0 and 1) reads the same samples, a slice each.
    dims = ParallelDims(world_size=dist.get_world_size(), rank=rank, sp=2)
    sp = build_dataloader(
        cfg, "train", batch_size=4, seed=5, sp_size=dims.sp, sp_rank=dims.sp_rank, replication=dims.replication
    )
    stream = iter(sp)
    result["sp"] = [rows(next(stream)) for _ in range(3)]
    result["sp_state"] = sp.state_dict()

    with open(f"{out_prefix}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
