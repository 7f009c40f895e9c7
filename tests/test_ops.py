"""The SSD scan and the causal conv: chunked form and step form against the recurrence."""

import pytest
import torch

from mambaify import ops


def random_inputs(b=2, t=37, h=3, p=5, n=4, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x, B, C = r(b, t, h, p), r(b, t, h, n), r(b, t, h, n)
    dt = torch.nn.functional.softplus(r(b, t, h))
    A = -torch.rand(h, generator=g, dtype=dtype) * 2 - 0.1
    D = r(h)
    S0 = r(b, h, n, p)
    tensors = [x, dt, A, B, C, D, S0]
    if requires_grad:
        for v in tensors:
            v.requires_grad_(True)
    return tensors


@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_equals_sequential_with_initial_state(chunk):
    x, dt, A, B, C, D, S0 = random_inputs(t=37)  # 37 is no multiple of any chunk size here
    y_ref, s_ref = ops.ssd_sequential(x, dt, A, B, C, D, initial_state=S0)
    y, s = ops.ssd_chunked(x, dt, A, B, C, D, initial_state=S0, chunk_size=chunk)
    assert (y - y_ref).abs().max() < 1e-10
    assert (s - s_ref).abs().max() < 1e-10


def test_chunked_gradients_equal_sequential():
    inputs = random_inputs(t=29, requires_grad=True)
    x, dt, A, B, C, D, S0 = inputs
    w = torch.randn(2, 29, 3, 5, dtype=torch.float64)
    ws = torch.randn(2, 3, 4, 5, dtype=torch.float64)

    def grads(fn):
        y, s = fn()
        loss = (y * w).sum() + (s * ws).sum()
        return torch.autograd.grad(loss, inputs)

    g_ref = grads(lambda: ops.ssd_sequential(x, dt, A, B, C, D, initial_state=S0))
    g_chk = grads(lambda: ops.ssd_chunked(x, dt, A, B, C, D, initial_state=S0, chunk_size=8))
    for a, b in zip(g_ref, g_chk):
        assert (a - b).abs().max() < 1e-10


def test_reset_equals_separate_documents():
    # Two documents packed in one row must give what each gives alone (state cleared at the boundary).
    x, dt, A, B, C, D, _ = random_inputs(b=1, t=30)
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, 0] = reset[0, 11] = True
    y_packed, _ = ops.ssd_chunked(x, dt, A, B, C, D, reset=reset, chunk_size=8)
    y_seq, _ = ops.ssd_sequential(x, dt, A, B, C, D, reset=reset)
    y1, _ = ops.ssd_sequential(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], D)
    y2, _ = ops.ssd_sequential(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], D)
    expected = torch.cat([y1, y2], dim=1)
    assert (y_packed - expected).abs().max() < 1e-10
    assert (y_seq - expected).abs().max() < 1e-10
    # and gradients stay finite through the -inf decay
    x.requires_grad_(True)
    dt.requires_grad_(True)
    y, s = ops.ssd_chunked(x, dt, A, B, C, D, reset=reset, chunk_size=8)
    gx, gdt = torch.autograd.grad(y.sum() + s.sum(), (x, dt))
    assert torch.isfinite(gx).all() and torch.isfinite(gdt).all()


def test_step_equals_sequential():
    x, dt, A, B, C, D, S0 = random_inputs(t=6)
    y_ref, s_ref = ops.ssd_sequential(x, dt, A, B, C, D, initial_state=S0)
    state = S0
    for i in range(6):
        y, state = ops.ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
        assert (y - y_ref[:, i]).abs().max() < 1e-12
    assert (state - s_ref).abs().max() < 1e-12


def test_ssd_is_causal_linear_attention_without_decay():
    # With A = 0 (no decay), dt = 1 and D = 0 the scan is causal linear attention.
    x, _, _, B, C, _, _ = random_inputs(t=13)
    y, _ = ops.ssd_chunked(x, torch.ones(2, 13, 3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype), B, C, chunk_size=4)
    scores = torch.einsum("bihn,bjhn->bhij", C, B).tril()
    expected = torch.einsum("bhij,bjhp->bihp", scores, x)
    assert (y - expected).abs().max() < 1e-10


def test_causal_conv_chunks_and_documents():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    # Against torch's own depthwise conv.
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], bias, padding=3, groups=6)[..., :17]
    y, state = ops.causal_conv1d(x, w, bias)
    assert (y - ref.transpose(1, 2)).abs().max() < 1e-12
    # In two pieces with the state carried over, including a piece shorter than the window.
    y1, s1 = ops.causal_conv1d(x[:, :2], w, bias)
    y2, s2 = ops.causal_conv1d(x[:, 2:], w, bias, initial_state=s1)
    assert (torch.cat([y1, y2], 1) - y).abs().max() < 1e-12
    assert (s2 - state).abs().max() == 0
    # Packed documents: a tap never reaches into the previous document.
    pos = torch.cat([torch.arange(5), torch.arange(12)])[None].expand(2, -1)
    yp, _ = ops.causal_conv1d(x, w, bias, seq_pos=pos)
    ya, _ = ops.causal_conv1d(x[:, :5], w, bias)
    yb, _ = ops.causal_conv1d(x[:, 5:], w, bias)
    assert (yp - torch.cat([ya, yb], 1)).abs().max() < 1e-12


def test_backend_selection():
    assert ops.select_backend(torch.device("cpu")) == "chunked"
    assert ops.select_backend(torch.device("cpu"), "sequential") == "sequential"
    with pytest.raises(ValueError, match="unknown SSD backend"):
        ops.select_backend(torch.device("cpu"), "nope")
