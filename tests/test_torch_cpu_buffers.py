"""The CPU gradient-buffer cache: reuse only what no tensor holds."""

import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt
from softxent.torch import cpu_buffers

SHAPE = (128, 1 << 16)  # 32 MiB of float32: large enough to be cached, and so is half of it


@pytest.fixture(autouse=True)
def clean_cache():
    cpu_buffers.empty_cache()
    yield
    cpu_buffers.empty_cache()


def test_a_freed_buffer_is_reused_and_a_live_one_never_is():
    a = cpu_buffers.empty(SHAPE, torch.float32)
    b = cpu_buffers.empty(SHAPE, torch.float32)
    assert a.data_ptr() != b.data_ptr()
    view = a[3:].t()  # a view alone keeps the buffer in use
    ptr = a.data_ptr()
    del a
    c = cpu_buffers.empty(SHAPE, torch.float32)
    assert c.data_ptr() not in (ptr, b.data_ptr())
    del view
    d = cpu_buffers.empty(SHAPE, torch.float32)
    assert d.data_ptr() == ptr


def test_buffers_serve_requests_of_half_their_size_up_but_not_smaller():
    big = cpu_buffers.empty(SHAPE, torch.float32)
    ptr = big.data_ptr()
    del big
    half = cpu_buffers.empty((SHAPE[0] // 2, SHAPE[1]), torch.bfloat16)  # a quarter of the bytes
    assert half.data_ptr() != ptr
    same = cpu_buffers.empty((SHAPE[0] // 2, SHAPE[1]), torch.float32)  # half of the bytes
    assert same.data_ptr() == ptr and same.dtype == torch.float32 and same.shape == (SHAPE[0] // 2, SHAPE[1])


def test_small_requests_bypass_the_cache_and_empty_cache_releases_free_buffers():
    small = cpu_buffers.empty((4, 4), torch.float64)
    assert small.shape == (4, 4) and cpu_buffers.cached_bytes() == 0
    held = cpu_buffers.empty(SHAPE, torch.float32)
    freed = cpu_buffers.empty(SHAPE, torch.float32)
    del freed
    assert cpu_buffers.cached_bytes() == 2 * held.numel() * 4
    cpu_buffers.empty_cache()
    assert cpu_buffers.cached_bytes() == held.numel() * 4


def test_training_steps_reuse_one_gradient_buffer_and_stay_correct():
    x = torch.randn(SHAPE, requires_grad=True)
    t = torch.randint(0, SHAPE[1], (SHAPE[0],))
    grads = []
    for step in range(3):
        x.grad = None
        sxt.cross_entropy(x * (1.0 + step), t).backward()
        grads.append(x.grad)  # kept alive: the next step must not overwrite it
    for step, g in enumerate(grads):
        want = torch.autograd.grad(F.cross_entropy(x * (1.0 + step), t), x)[0]
        torch.testing.assert_close(g, want)
    assert len({g.data_ptr() for g in grads}) == 3
    del grads
    x.grad = None
    sxt.cross_entropy(x, t).backward()
    assert cpu_buffers.cached_bytes() <= (cpu_buffers.MAX_FREE_BUFFERS + 1) * x.numel() * 4


def test_trimming_past_a_buffer_in_use_keeps_it_and_drops_the_oldest_free_ones():
    # one buffer in use ahead of more than MAX_FREE_BUFFERS free ones: trimming must not compare arrays by value
    held = cpu_buffers.empty(SHAPE, torch.float32)
    held_ptr = held.data_ptr()
    rows = SHAPE[0]
    for _ in range(cpu_buffers.MAX_FREE_BUFFERS + 3):
        rows = rows * 2 + 1  # each request more than twice the last: no free buffer fits it
        cpu_buffers.empty((rows, SHAPE[1] // 8), torch.float32)
    assert held.data_ptr() == held_ptr
    held.fill_(1.0)
    # kept: the buffer in use, MAX_FREE_BUFFERS free ones and the last one handed out (free once its tensor died)
    assert len(cpu_buffers._buffers) == cpu_buffers.MAX_FREE_BUFFERS + 2
    assert cpu_buffers.cached_bytes() > held.numel() * 4


def test_linear_cross_entropy_with_growing_batches_and_a_kept_weight_gradient():
    V, D = 65536, 64
    w = torch.randn(V, D, requires_grad=True)
    for n in range(64, 72):
        x = torch.randn(n, D, requires_grad=True)
        t = torch.randint(0, V, (n,))
        sxt.linear_cross_entropy(x, w, t, chunk_size=n).backward()
    assert torch.isfinite(w.grad).all()
