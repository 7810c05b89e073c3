"""The one loss (msllm.train.loss): every kernel against the dense reference, values and gradients.

The fused kernels (liger, cce) run here too, through msllm's own lm_loss, on the CPU: Liger's Triton
kernels under Triton's interpreter (TRITON_INTERPRET=1), Cut Cross-Entropy through its
torch.compile implementation (what msllm calls off CUDA; on CUDA it calls its Triton kernels, which
only a GPU runs: the needs-CUDA tests at the end). MSLLM_ALLOW_CPU_KERNELS=1 lets choose_kernel
accept them off CUDA.

Tolerances: fp32, 1e-5 relative on the loss and 1e-5 absolute on gradients of magnitude ~1 (the
chunks sum in another order than one big matmul); bf16, 1e-2 relative on the loss and 3e-2 on the
gradients (bf16 has 8 bits of mantissa; the chunked kernel accumulates the weight's gradient in fp32,
dense in bf16, so the two differ by bf16 rounding).
"""

import os

import pytest
import torch

from fixtures.kernels import cpu_kernels  # noqa: F401 (a fixture)
from fixtures.models import ARCHS, tiny_model
from msllm.errors import RecipeError
from msllm.train.loss import IGNORE_INDEX, choose_kernel, chunk_rows, installed, lm_loss, model_loss
from msllm.train.memory import saved_for_backward

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 3e-2)}  # (loss rtol, gradient atol)


def loss_and_grads(kernel, hidden, weight, labels, chunk_size=0, scale=1.0):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = lm_loss(hidden, weight, labels, kernel, chunk_size)
    (loss * scale).backward()
    return loss.detach().float(), hidden.grad.float(), weight.grad.float()


def case(n=300, d=32, vocab=500, dtype=torch.float32, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (0.3 * torch.randn(vocab, d, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [0, 64, 7, 1, 1000])  # 7 and 64 do not divide 300; 1000 > N: one chunk
def test_chunked_matches_dense_values_and_gradients(dtype, chunk_size):
    hidden, weight, labels = case(dtype=dtype, ignore_every=5)
    rtol, atol = TOLERANCES[dtype]
    dense = loss_and_grads("dense", hidden, weight, labels, scale=0.37)
    chunked = loss_and_grads("chunked", hidden, weight, labels, chunk_size, scale=0.37)
    torch.testing.assert_close(chunked[0], dense[0], rtol=rtol, atol=0)
    for got, want in zip(chunked[1:], dense[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_ignored_positions_have_no_loss_and_no_gradient():
    hidden, weight, labels = case(n=40)
    labels[10:20] = IGNORE_INDEX
    loss, grad_hidden, _ = loss_and_grads("chunked", hidden, weight, labels, chunk_size=8)
    kept = torch.cat((torch.arange(10), torch.arange(20, 40)))
    alone, _, _ = loss_and_grads("chunked", hidden[kept], weight, labels[kept], chunk_size=8)
    torch.testing.assert_close(loss, alone, rtol=1e-6, atol=0)
    assert grad_hidden[10:20].abs().max() == 0
    assert grad_hidden[:10].abs().max() > 0


def test_a_chunk_of_ignored_labels_and_an_empty_input():
    hidden, weight, labels = case(n=32)
    labels[:16] = IGNORE_INDEX  # the whole first chunk of 16
    dense = loss_and_grads("dense", hidden, weight, labels)
    chunked = loss_and_grads("chunked", hidden, weight, labels, chunk_size=16)
    for got, want in zip(chunked, dense):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    empty = loss_and_grads("chunked", hidden[:0], weight, labels[:0], chunk_size=16)
    assert empty[0].item() == 0.0 and empty[1].shape == (0, 32) and empty[2].abs().max() == 0


def test_batched_shapes_and_no_grad_give_the_same_sum():
    hidden, weight, labels = case(n=4 * 50)
    flat = lm_loss(hidden, weight, labels, "chunked", 33)
    with torch.no_grad():
        batched = lm_loss(hidden.view(4, 50, -1), weight, labels.view(4, 50), "chunked", 33)
    torch.testing.assert_close(batched, flat)
    torch.testing.assert_close(flat, lm_loss(hidden, weight, labels, "dense"), rtol=1e-5, atol=0)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_trains_with_the_same_gradients_through_either_kernel(arch, tie):
    """model_loss runs the loss inside the model's forward on its hidden states and head weight:
    the same as cross-entropy on the logits, with tied embeddings getting both gradients."""
    model = tiny_model(arch, vocab_size=300, tie_embeddings=tie)
    ids = torch.randint(0, 300, (2, 37))  # not a multiple of the pooling factor
    labels = torch.randint(0, 300, (2, 37))
    labels[0, :5] = IGNORE_INDEX
    grads = {}
    for kernel in ("dense", "chunked"):
        model.zero_grad()
        loss = model_loss(model, ids, labels, kernel, chunk_size=16)
        loss.backward()
        grads[kernel] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    reference = torch.nn.functional.cross_entropy(model(ids).reshape(-1, 300), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(grads["chunked"][0], reference.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grads["chunked"][0], grads["dense"][0], rtol=1e-5, atol=0)
    for name, g in grads["dense"][1].items():
        torch.testing.assert_close(grads["chunked"][1][name], g, rtol=0, atol=1e-5, msg=name)
    if tie:
        assert model.lm_head.weight is model.embed.weight


def test_gradients_accumulate_over_micro_batches():
    hidden, weight, labels = case(n=64)
    weight = weight.clone().requires_grad_()
    for kernel in ("dense", "chunked"):
        weight.grad = None
        for half in (slice(0, 32), slice(32, 64)):
            lm_loss(hidden[half], weight, labels[half], kernel, 10).backward()
        if kernel == "dense":
            want = weight.grad.clone()
    torch.testing.assert_close(weight.grad, want, rtol=0, atol=1e-5)


def test_the_chunked_kernel_never_holds_the_logits():
    """What it saves for backward is the size of the hidden states and of the weight, never of
    N x vocab; dense saves the fp32 log-probabilities."""
    n, d, vocab = 512, 16, 4096
    hidden, weight, labels = case(n=n, d=d, vocab=vocab)
    sizes = {}
    for kernel in ("dense", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with saved_for_backward() as storages:
            lm_loss(h, w, labels, kernel, chunk_size=64)
        sizes[kernel] = sorted(storages.values())
    assert max(sizes["dense"]) >= n * vocab * 4
    assert max(sizes["chunked"]) <= vocab * d * 4
    assert sum(sizes["chunked"]) <= (n * d + vocab * d) * 4


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("MSLLM_ALLOW_CPU_KERNELS", raising=False)
    assert choose_kernel("auto", "cpu") == "chunked"
    assert choose_kernel("dense", "cpu") == "dense"
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        choose_kernel("liger", "cpu")
    monkeypatch.setattr("msllm.train.loss.installed", lambda kernel: True)
    assert choose_kernel("liger", "cpu", allow_cpu=True) == "liger"
    monkeypatch.setenv("MSLLM_ALLOW_CPU_KERNELS", "1")
    assert choose_kernel("cce", "cpu") == "cce"
    assert choose_kernel("auto", "cpu") == "chunked"  # auto never picks a fused kernel off CUDA
    assert chunk_rows(32000) == 262 and chunk_rows(8000) == 1048 and chunk_rows(10**9) == 16 and chunk_rows(5, 3) == 3


# ----------------------------------------------------------------------------------------------
# The fused kernels on the CPU (Liger under Triton's interpreter, CCE's torch.compile implementation)
# ----------------------------------------------------------------------------------------------

FUSED_TOLERANCES = (1e-5, 1e-5)  # fp32: loss relative, gradients absolute (as chunked against dense)


def test_liger_compiled_for_a_gpu_cannot_be_interpreted_later(monkeypatch):
    """enable_cpu_kernels after liger's kernels were defined for a GPU: one line, nothing set."""
    import sys
    import types

    from msllm.errors import KernelError
    from msllm.train.loss import enable_cpu_kernels

    jit = pytest.importorskip("triton.runtime.jit")

    def kernel(x):
        pass

    module = types.ModuleType("liger_kernel.ops.made_up")
    module.kernel = jit.JITFunction(kernel)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.made_up", module)
    monkeypatch.delenv("MSLLM_ALLOW_CPU_KERNELS", raising=False)
    with pytest.raises(KernelError, match="was imported before TRITON_INTERPRET=1 was set"):
        enable_cpu_kernels()
    assert "MSLLM_ALLOW_CPU_KERNELS" not in os.environ


@pytest.mark.parametrize("kernel", ["liger", "cce"])
@pytest.mark.usefixtures("cpu_kernels")
def test_fused_kernels_match_chunked_on_the_cpu(kernel):
    """Values and gradients through lm_loss, with ignored labels and a batch dimension; small
    sizes (N=64, d=32, vocab=300): the interpreter runs Triton's programs in Python."""
    if not installed(kernel):
        pytest.skip(f"{kernel} is not installed (pip install -e '.[dev]')")
    assert choose_kernel(kernel, "cpu") == kernel
    hidden, weight, labels = case(n=64, d=32, vocab=300, ignore_every=5)
    chunked = loss_and_grads("chunked", hidden, weight, labels, chunk_size=16, scale=0.37)
    fused = loss_and_grads(kernel, hidden.view(4, 16, 32), weight, labels.view(4, 16), scale=0.37)
    rtol, atol = FUSED_TOLERANCES
    torch.testing.assert_close(fused[0], chunked[0], rtol=rtol, atol=0)
    for got, want in zip(fused[1:], chunked[1:]):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=atol)


@pytest.mark.parametrize("kernel", ["liger", "cce"])
@pytest.mark.usefixtures("cpu_kernels")
def test_a_tiny_model_trains_3_steps_on_a_fused_kernel_as_on_chunked(kernel):
    """The bare step (msllm.train.bare: model_loss, backward, AdamW) three times from the same
    weights: the same losses (1e-5 relative) and the same weights after (1e-5 absolute: AdamW's
    first steps move each weight by about lr whatever the gradient's size, so a gradient that
    differs in sign somewhere would show as 2 * lr = 2e-3)."""
    if not installed(kernel):
        pytest.skip(f"{kernel} is not installed (pip install -e '.[dev]')")
    from msllm.train.bare import bare_step

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 2, 17), generator=g)
    labels = torch.randint(0, 300, (3, 2, 17), generator=g)
    labels[:, 0, :3] = IGNORE_INDEX
    runs = {}
    for name in ("chunked", kernel):
        model = tiny_model("bottom_up", vocab_size=300)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = [bare_step(model, optimizer, ids[i], labels[i], loss_kernel=name, loss_chunk_size=8) for i in range(3)]
        runs[name] = torch.stack(losses), dict(model.named_parameters())
    torch.testing.assert_close(runs[kernel][0], runs["chunked"][0], rtol=1e-5, atol=0)
    assert runs["chunked"][0][2] < runs["chunked"][0][0]  # it learns (the same batch order as below)
    for name, p in runs["chunked"][1].items():
        torch.testing.assert_close(runs[kernel][1][name], p, rtol=0, atol=1e-5, msg=name)


@pytest.mark.needs_cuda("the fused kernels are CUDA-only")
@pytest.mark.parametrize("kernel", ["liger", "cce"])
def test_fused_cuda_kernels_match_chunked(kernel):
    if not installed(kernel):
        pytest.skip(f"{kernel} is not installed (pip install 'msllm[gpu]')")
    assert choose_kernel(kernel, "cuda") == kernel
    hidden, weight, labels = (t.cuda() for t in case(n=4096, d=256, vocab=32000, dtype=torch.bfloat16, ignore_every=9))
    chunked = loss_and_grads("chunked", hidden, weight, labels)
    fused = loss_and_grads(kernel, hidden, weight, labels)
    torch.testing.assert_close(fused[0], chunked[0], rtol=1e-2, atol=0)
    for got, want in zip(fused[1:], chunked[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=3e-2)
