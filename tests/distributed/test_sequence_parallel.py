"""Sequence parallelism: the halo exchange, DeepSpeed-Ulysses attention and every architecture,
split over 2 or 4 gloo ranks, match the unsplit computation in float64 (outputs and gradients).

The training-level check (same losses step after step with sp=2 as with sp=1) is in
test_train_sequence_parallel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.launch import clean_env, torchrun
from msllm.models.registry import ARCHS, SPECS
from msllm.models.spec import LOCAL, UNSUPPORTED

SCRIPT = Path(__file__).parent / "sp_equivalence.py"
CHECKS = [
    "halo-shift",
    "halo-local-attention",
    "ulysses-attention",
    "vanilla",
    "vanilla-local",
    "bottom_up",
    "top_down",
    "retina",
    "retina-k4",
]
CHECKS += [arch for arch in ARCHS if arch not in CHECKS]  # every registered architecture (sp_equivalence adds it)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc,sp",
    # sp 2 stays in the fast tier; the 4-rank layouts take 10-40 s each on 2 cores
    [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow), pytest.param(4, 4, marks=pytest.mark.slow)],
    ids=["sp2", "dp2xsp2", "sp4"],
)
def test_split_computation_matches_the_unsplit_one(nproc, sp):
    done = torchrun(nproc, SCRIPT, env=clean_env(SP=str(sp)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "ALL CHECKS PASSED" in done.stdout
    checked = [line for line in done.stdout.splitlines() if line.startswith("CHECKED")]
    for name in CHECKS:
        assert any(line.startswith(f"CHECKED {name} ") for line in checked), f"{name} was not checked"


def _module_classes(arch: str) -> set[type]:
    """The module classes of `arch`'s models, over its spec's tiny model and the variants that add
    modules: the shared blocks' options (linear pooling and upsampling, Mamba-2 layers and dynamic
    chunking where the architecture takes them) and its own (ArchSpec.tiny_variants)."""
    from fixtures.models import tiny_config
    from msllm.config import MambaConfig, ScaleConfig
    from msllm.models import build_model

    base = tiny_config(arch)
    variants = [base]
    if base.arch_config.multi_scale:
        variants.append(tiny_config(arch, pooling="linear", upsampling="linear"))
    if "mamba2" in base.arch_config.mixers:
        mamba = MambaConfig(d_state=8, head_dim=16, chunk_size=8)
        variants.append(
            tiny_config(arch, mamba=mamba, scales=[ScaleConfig(1, 1, mixer="mamba2"), ScaleConfig(2, 1, "full")])
        )
    if base.arch_config.dynamic_pool:
        variants.append(
            tiny_config(arch, scales=[ScaleConfig(1, 1, "local", 8), ScaleConfig(1, 1, "full", pool="dynamic")])
        )
    variants += [tiny_config(arch, **overrides) for overrides in SPECS[arch].tiny_variants]  # its own options
    with torch.device("meta"):
        return {type(m) for cfg in variants for m in build_model(cfg, device="meta").modules()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_module_class_has_a_declared_sequence_parallel_kind(arch):
    """A module class that no spec declares (msllm.models.spec: a swap kind, local, or unsupported)
    would be left as it is under sequence parallelism, silently wrong if it mixes positions:
    apply_sequence_parallel refuses it, and this test names it before any run does."""
    from msllm.distributed.sequence import SWAPS, own_swap

    kinds = SPECS[arch].module_kinds()
    undeclared = sorted(c.__qualname__ for c in _module_classes(arch) if c not in kinds)
    assert not undeclared, f"{arch}: declare the sequence-parallel kind of {undeclared} in its spec (msllm.models.spec)"
    known = (*SWAPS, LOCAL, UNSUPPORTED)  # or the dotted path of the architecture's own swap
    unknown = {kind for kind in kinds.values() if kind not in known and not callable(own_swap(kind))}
    assert not unknown, f"{arch}: kinds {unknown} have no swap in msllm.distributed.sequence.SWAPS"
