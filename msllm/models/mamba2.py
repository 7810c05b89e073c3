"""Mamba-2 layers (`mixer: mamba2` on a scale): the SSD (state-space duality) mixer of Dao and Gu,
"Transformers are SSMs" (2024, arXiv 2405.21060), in plain PyTorch, as H-Net uses it for its
byte-level encoder and decoder (its `m` layers).

    MambaBlock:   x + Mamba2Mixer(RMSNorm(x))                     (no MLP, as H-Net's `m` layers)
    Mamba2Mixer:  u [B, L, d] -> w_in -> z [B, L, E], xBC [B, L, E + 2N], dt [B, L, H]   (E = expand * d)
                  xBC -> causal depthwise conv (width d_conv) -> SiLU -> x [B, L, H, P], B, C [B, L, N]
                  dt -> softplus(dt + dt_bias);  A = -exp(A_log)  (one per head)
                  state:  S_t = exp(dt_t A) S_(t-1) + dt_t x_t B_t^T     ([H, P, N] per row)
                  output: y_t = S_t C_t + D x_t
                  y -> RMSNorm(y * SiLU(z)) (the gated norm) -> wo -> [B, L, d]

The recurrence is computed by the chunked SSD scan (`ssd_scan`, the paper's block decomposition):
the sequence is cut into chunks of Q positions; within a chunk the output is a masked
attention-like product (C_l . B_s) exp(sum of dt A over s < k <= l) dt_s x_s; the state each chunk
leaves is carried to the next chunks by a recurrence over the chunk count (one [chunks, chunks]
decay matrix), and read by each position through C_l. Cost O(L Q) per head, memory one [Q, Q]
matrix per head and chunk. `recurrent_scan` is the plain sequential recurrence (the reference of
the tests). Everything after the projections runs in fp32 at least (autocast off), as Mamba-2's
kernels do; the output goes back to the input's dtype.

Causality: the convolution reads positions t - d_conv + 1 .. t (zeros before the start), the
state S_t sums positions <= t: nothing reads a later position. Sequences of any length are padded
at the end to a multiple of Q with dt = 0 there (no decay, no input): earlier outputs and the final
state are unchanged.

Cached decoding: a block's cache (`Mamba2State`) is the last d_conv - 1 inputs of the convolution
and the state S; a single new token takes the recurrent step, several (a prompt, a chunk) the scan
from the cached state. Either returns what the full forward pass gives at those positions.

On CUDA, with the mamba-ssm package installed (`pip install 'msllm[mamba]'`), the training scan
runs mamba_ssm's fused kernel (mamba_chunk_scan_combined) instead: `scan_kernel_for(device)` picks,
`use_scan_kernel` fixes the choice for the process. Not under sequence parallelism yet (config
validation refuses parallel.sp > 1 with a Mamba-2 scale).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from msllm.models.chunking import _at_least_fp32, _no_autocast
from msllm.models.layers import RMSNorm, make_blocks

SCAN_KERNELS = ("torch", "mamba_ssm")
_forced_scan_kernel: str | None = None


def _mamba_ssm_scan():
    """mamba_ssm's fused chunked scan, or None where it is not installed. Imported by name so that an
    exported model (msllm.use.hf.assemble) needs nothing beyond torch and uses it where present."""
    try:
        return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    except Exception:  # not installed, or installed without its compiled parts
        return None


def scan_kernel_for(device: torch.device) -> str:
    """ "mamba_ssm" on CUDA where the package imports, else "torch" (or what use_scan_kernel fixed)."""
    if _forced_scan_kernel is not None:
        return _forced_scan_kernel
    return "mamba_ssm" if device.type == "cuda" and _mamba_ssm_scan() is not None else "torch"


def use_scan_kernel(kernel: str | None) -> None:
    """Make every later training scan use `kernel` (one of SCAN_KERNELS); None: back to the choice by device."""
    global _forced_scan_kernel
    if kernel is not None and kernel not in SCAN_KERNELS:
        raise ValueError(f"unknown Mamba-2 scan kernel {kernel!r} (one of {', '.join(SCAN_KERNELS)})")
    _forced_scan_kernel = kernel


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., T] -> [..., T, T]: entry [i, j] = a_(j+1) + ... + a_i for j <= i (0 on the diagonal),
    -inf above it. Summed per entry (a cumulative sum down the columns of a masked copy), not as a
    difference of two long cumulative sums, which loses the small ones to rounding."""
    T = a.shape[-1]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    terms = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~below, 0.0)  # [..., k, j] = a_k for k > j
    sums = terms.cumsum(dim=-2)
    return sums.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan. x [b, L, H, P], dt [b, L, H] (> 0), A [H] (< 0), B, C [b, L, N];
    initial_state [b, H, P, N] or None (zeros). Returns y [b, L, H, P] (without the D skip) and the
    state after the last position [b, H, P, N]. Computes in x's dtype (the caller's fp32 or fp64)."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    pad = -L % chunk
    if pad:  # dt = 0 and x = 0 at the padding: no decay and no input, the final state unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    n = (L + pad) // chunk
    x, dt = x.reshape(b, n, chunk, H, P), dt.reshape(b, n, chunk, H)
    B, C = B.reshape(b, n, chunk, N), C.reshape(b, n, chunk, N)
    log_decay = (dt * A).permute(0, 3, 1, 2)  # [b, H, n, Q]: log of each position's decay
    within = log_decay.cumsum(dim=-1)  # from the chunk's start up to and including l
    xdt = x * dt.unsqueeze(-1)  # [b, n, Q, H, P]: the input each position adds
    # 1. inside each chunk: y_l = sum_(s <= l) (C_l . B_s) exp(sum_(s < k <= l) log_decay_k) xdt_s
    mixing = torch.einsum("bcln,bcsn->bcls", C, B).unsqueeze(1) * segment_sums(log_decay).exp()  # [b, H, n, Q, Q]
    y = torch.einsum("bhcls,bcshp->bclhp", mixing, xdt)
    # 2. the state each chunk adds by its end: sum_s exp(sum_(s < k <= Q-1) log_decay_k) xdt_s B_s^T
    to_end = (within[..., -1:] - within).exp()  # [b, H, n, Q]
    added = torch.einsum("bhcs,bcshp,bcsn->bchpn", to_end, xdt, B)
    # 3. the state entering each chunk (and after the last): a recurrence over chunks, as one product
    if initial_state is None:
        initial_state = x.new_zeros(b, H, P, N)
    states = torch.cat((initial_state.to(x.dtype).unsqueeze(1), added), dim=1)  # [b, n + 1, H, P, N]
    carry = segment_sums(F.pad(within[..., -1], (1, 0))).exp()  # [b, H, n + 1, n + 1]
    entering = torch.einsum("bhij,bjhpn->bihpn", carry, states)
    # 4. what the entering state gives position l: exp(within_l) C_l . S_in
    y = y + torch.einsum("bcln,bchpn,bhcl->bclhp", C, entering[:, :-1], within.exp())
    return y.reshape(b, n * chunk, H, P)[:, :L], entering[:, -1]


def recurrent_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as ssd_scan, one position at a time (the recurrence as written in the module
    docstring): the reference of the tests, and the decoding step."""
    b, L, H, P = x.shape
    state = x.new_zeros(b, H, P, B.shape[-1]) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)  # [b, H]
        state = state * decay[:, :, None, None] + torch.einsum("bh,bhp,bn->bhpn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1), state


class GatedRMSNorm(RMSNorm):
    """Mamba-2's output norm: RMSNorm(y * SiLU(z)) over the whole inner width (one group), in fp32."""

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = y.dtype
        gated = y.float() * F.silu(z.float())
        gated = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * gated).to(dtype)


class Mamba2State:
    """One Mamba-2 layer's decoding cache: the last d_conv - 1 inputs of its convolution
    [B, channels, d_conv - 1] and its state [B, H, P, N] (fp32 at least), after `position` positions."""

    def __init__(self):
        self.position = 0
        self.conv: torch.Tensor | None = None
        self.ssm: torch.Tensor | None = None


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (module docstring). Parameters: w_in (z, x, B, C, dt in that order, no bias),
    conv (depthwise, with bias), dt_bias, A_log, D (one per head), norm (gated), wo (no bias);
    initialised by msllm.models.init after mamba_ssm's Mamba2."""

    def __init__(self, d: int, d_state: int, d_conv: int, expand: int, head_dim: int, chunk_size: int, eps: float):
        super().__init__()
        self.inner, self.d_state, self.head_dim, self.chunk_size = expand * d, d_state, head_dim, chunk_size
        self.n_heads = self.inner // head_dim
        self.channels = self.inner + 2 * d_state  # what the convolution mixes: x, B, C
        self.w_in = nn.Linear(d, self.inner + self.channels + self.n_heads, bias=False)
        self.conv = nn.Conv1d(self.channels, self.channels, d_conv, groups=self.channels, bias=True)
        self.conv.init = "mamba2"  # msllm.models.init: torch's Conv1d default, drawn per parameter
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.inner, eps)
        self.wo = nn.Linear(self.inner, d, bias=False)

    def forward(self, u: torch.Tensor, cache: Mamba2State | None = None) -> torch.Tensor:
        """u [B, L, d] -> [B, L, d]; with a `cache`, u holds the L positions after those it has seen."""
        b, L, _ = u.shape
        z, xBC, dt = self.w_in(u).split([self.inner, self.channels, self.n_heads], dim=-1)
        xBC = F.silu(self._convolve(xBC, cache))
        x, B, C = xBC.split([self.inner, self.d_state, self.d_state], dim=-1)
        x = x.reshape(b, L, self.n_heads, self.head_dim)
        if cache is None and u.device.type != "meta" and scan_kernel_for(u.device) == "mamba_ssm":
            y = self._fused_scan(x, dt, B, C)
        else:
            y = self._scan(x, dt, B, C, cache)
        return self.wo(self.norm(y.reshape(b, L, self.inner), z))

    def _convolve(self, xBC: torch.Tensor, cache: Mamba2State | None) -> torch.Tensor:
        """The causal depthwise convolution over positions: each output reads its input and the
        d_conv - 1 before it (zeros before the sequence, or the cache's)."""
        k = self.conv.kernel_size[0]
        xBC = xBC.transpose(1, 2)  # [B, channels, L]
        if cache is None:
            before = xBC.new_zeros(xBC.shape[0], self.channels, k - 1)
        else:
            if cache.conv is None:
                cache.conv = xBC.new_zeros(xBC.shape[0], self.channels, k - 1)
            before = cache.conv
        stream = torch.cat((before, xBC), dim=2)
        if cache is not None:
            cache.conv = stream[:, :, stream.shape[2] - (k - 1) :]
        return F.conv1d(stream, self.conv.weight, self.conv.bias, groups=self.channels).transpose(1, 2)

    def _scan(self, x, dt, B, C, cache: Mamba2State | None) -> torch.Tensor:
        out_dtype, dtype = x.dtype, _at_least_fp32(x)
        with _no_autocast(x):
            x, B, C = x.to(dtype), B.to(dtype), C.to(dtype)
            dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
            A = -torch.exp(self.A_log.to(dtype))
            initial = None if cache is None else cache.ssm
            if cache is not None and x.shape[1] == 1:  # a decoding step: the recurrence itself
                y, state = recurrent_scan(x, dt, A, B, C, initial)
            else:
                y, state = ssd_scan(x, dt, A, B, C, self.chunk_size, initial)
            if cache is not None:
                cache.ssm = state
                cache.position += x.shape[1]
            y = y + self.D.to(dtype)[:, None] * x
        return y.to(out_dtype)

    def _fused_scan(self, x, dt, B, C) -> torch.Tensor:
        """mamba_ssm's kernel (CUDA): the same recurrence, with the softplus, dt_bias and D inside."""
        scan = _mamba_ssm_scan()
        y = scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B.unsqueeze(2),
            C.unsqueeze(2),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
        )
        return y.to(x.dtype)


class MambaBlock(nn.Module):
    """Pre-norm Mamba-2 block: x + mixer(norm(x)) (H-Net's `m` layer: no MLP)."""

    def __init__(self, cfg):
        super().__init__()
        m = cfg.mamba
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg.d_model, m.d_state, m.d_conv, m.expand, m.head_dim, m.chunk_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cache: Mamba2State | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), cache)

    def new_cache(self) -> Mamba2State:
        return Mamba2State()


def make_layers(cfg, n_layers: int, mixer: str, core_factory) -> nn.ModuleList:
    """`n_layers` layers of a scale: Mamba-2 blocks (mixer "mamba2") or transformer blocks with
    attention cores from `core_factory()` (layers.make_blocks)."""
    if mixer == "mamba2":
        return nn.ModuleList(MambaBlock(cfg) for _ in range(n_layers))
    return make_blocks(cfg, n_layers, core_factory)
