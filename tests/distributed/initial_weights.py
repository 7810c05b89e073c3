"""Run under torchrun (tests/distributed/test_train_elastic.py): the initial weights as the trainer builds them
(msllm.train.engine.build_model_for_training) on every rank, at ZeRO 3 (partitioned by
deepspeed.zero.Init: gathered here) and at ZeRO 1 (materialised from the meta device), equal
build_model(seed) built whole in one process, bit for bit (d_model 66 and vocab 301: parameters
that do not split evenly over 4 ranks). Prints "identical" once per stage."""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch.distributed as dist

from msllm.config import from_dict
from msllm.models import build_model
from msllm.train.engine import build_model_for_training

MODEL = {
    "arch": "bottom_up",
    "d_model": 66,
    "n_heads": 3,
    "vocab_size": 301,
    "tie_embeddings": True,
    "final_layers": 1,
    "scales": [
        {"factor": 1, "layers": 1, "attention": "local", "window": 8},
        {"factor": 1, "layers": 1, "pool": "dynamic", "target_ratio": 3},
    ],
}


def main(tmp: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    whole = dict(build_model(from_dict({"model": MODEL}).model, seed=11).named_parameters())
    for stage in (3, 1):
        recipe = from_dict({"model": MODEL, "run": {"seed": 11, "output_dir": tmp}, "parallel": {"zero_stage": stage}})
        model = build_model_for_training(recipe, torch.device("cpu"))
        params = dict(model.named_parameters())
        assert params.keys() == whole.keys(), (params.keys(), whole.keys())
        if stage == 3:
            assert all(p.numel() == 0 for p in params.values()), "ZeRO-3 left a parameter whole on a rank"
            with deepspeed.zero.GatheredParameters(list(params.values())):
                differ = [n for n, p in params.items() if not torch.equal(p.detach(), whole[n].detach())]
        else:
            differ = [n for n, p in params.items() if not torch.equal(p.detach(), whole[n].detach())]
        assert not differ, f"ZeRO {stage}: {differ}"
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"ZeRO {stage} on {dist.get_world_size()} ranks: identical", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
