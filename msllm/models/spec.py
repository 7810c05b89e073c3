"""What an architecture declares about itself (`ArchSpec`), and the shared building blocks'
declarations every architecture starts from.

Each architecture is a folder, msllm/models/<arch>/: model.py (its module), config.py (its own
config fields and their checks, an msllm.config.ArchConfig) and __init__.py (its ArchSpec).
msllm.models.registry lists them; nothing outside an architecture's folder branches on its name.

Sequence parallelism (msllm.distributed.sequence) asks the spec what to do with each module class
of the model, by kind:

    "halo_attention"  local attention: the previous rank's last w keys and values
    "ulysses"         full attention: DeepSpeed-Ulysses all-to-all
    "halo_shift"      causal pooling's shift: the previous rank's last k-1 positions
    "sliced_rotary"   RoPE counted from the rank's first position
    "pkg.mod.func"    an architecture's own module's swap, named by its dotted path: a function
                      (module, group) -> its sequence-parallel form, e.g. retina's attention
                      (retina/parallelize.py: the fine keys' halo, each level's pooled keys gathered);
                      named, not imported, so that the spec stays free of torch.distributed
    LOCAL             the module looks at each position alone, or only through its children
                      (which are declared themselves), or within groups that never straddle ranks
    UNSUPPORTED       mixes positions and has no sequence-parallel form: the recipe checks keep it
                      away from sp > 1 (msllm.config.validate)

A module class of a built model that its spec does not declare is a bug that
tests/distributed/test_sequence_parallel.py catches, so a new cross-position module cannot be left
unparallelised by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from msllm.models.attention import FullCausalAttention, LocalCausalAttention
from msllm.models.chunking import DynamicChunking
from msllm.models.layers import Attention, Block, CausalPool, RMSNorm, Rotary, ShiftRight, SwiGLU, Upsample
from msllm.models.mamba2 import GatedRMSNorm, Mamba2Mixer, MambaBlock

LOCAL = "local"
UNSUPPORTED = "unsupported"

# The shared building blocks (layers.py, attention.py, chunking.py, mamba2.py) and torch's own.
SHARED_MODULES: dict[type, str] = {
    LocalCausalAttention: "halo_attention",
    FullCausalAttention: "ulysses",
    ShiftRight: "halo_shift",
    Rotary: "sliced_rotary",
    Attention: LOCAL,  # projections, with its core and rotary declared above
    Block: LOCAL,
    SwiGLU: LOCAL,
    RMSNorm: LOCAL,
    GatedRMSNorm: LOCAL,
    CausalPool: LOCAL,  # groups of k aligned to multiples of k (a rank holds whole groups); its shift is declared
    Upsample: LOCAL,
    nn.Embedding: LOCAL,
    nn.Linear: LOCAL,
    nn.ModuleList: LOCAL,
    nn.Identity: LOCAL,
    DynamicChunking: UNSUPPORTED,  # pool: dynamic is refused with sp > 1
    Mamba2Mixer: UNSUPPORTED,  # mixer: mamba2 is refused with sp > 1
    MambaBlock: LOCAL,
    nn.Conv1d: UNSUPPORTED,  # Mamba-2's short causal convolution
}


@dataclass(frozen=True)
class ArchSpec:
    """One architecture, all in one place."""

    name: str  # model.arch in recipes
    summary: str  # one line, for listings
    config: type  # its ArchConfig (msllm.config): own fields, checks, shape flags
    model: type  # its nn.Module: model(model_cfg) builds it (torch's default init; msllm.models.build_model inits)
    # Its own module classes and what sequence parallelism does with each (kinds above); the shared
    # building blocks' come from SHARED_MODULES.
    modules: dict[type, str] = field(default_factory=dict)
    # The model-section fields (scales as ScaleConfig keyword dicts, and its own fields) of a tiny
    # model of it, which the tests that run on every registered architecture build
    # (tests/fixtures/models.py: causality, sequence-parallel equivalence, decoding, export).
    tiny: dict = field(default_factory=dict)
    # Overrides of `tiny` that switch on its own options which add modules (the test that every
    # module class has a declared sequence-parallel kind builds them).
    tiny_variants: tuple[dict, ...] = ()

    def module_kinds(self) -> dict[type, str]:
        """Every module class this architecture may hold, with its sequence-parallel kind."""
        return {**SHARED_MODULES, **self.modules}
