"""Scalars and dtypes at the edges: uint64 targets past 2⁶³, softcaps that float32
cannot hold, weights summing to zero, D = 0 layers, ignore_index/chunk_size past
int64, and float dtypes the kernels do not compute in."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent as sx
import softxent.torch as sxt


def test_uint64_targets_past_int64_are_refused_not_wrapped_to_ignore_index():
    logits = np.zeros((2, 3), np.float32)
    target = np.array([0, 2**64 - 100], dtype=np.uint64)  # int64 would read −100 = ignore_index
    with pytest.raises(ValueError, match="target contains class index 18446744073709551516"):
        sx.cross_entropy(logits, target)
    with pytest.raises(ValueError, match="target contains class index 18446744073709551516"):
        sxt.cross_entropy(torch.zeros(2, 3), torch.from_numpy(target.view(np.int64)).view(torch.uint64))
    with pytest.raises(ValueError, match="target contains class index"):
        sxt.linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([1, 2**63 + 1], dtype=torch.uint64))


def test_uint64_targets_in_range_work():
    x = torch.randn(3, 4)
    t = torch.tensor([0, 3, 1])
    expected = F.cross_entropy(x, t)
    torch.testing.assert_close(sxt.cross_entropy(x, t.to(torch.uint64)), expected)
    assert sx.cross_entropy(x.numpy(), t.numpy().astype(np.uint64)) == pytest.approx(expected.item(), rel=1e-6)


def test_infinite_softcap_is_no_cap():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(sxt.cross_entropy(x, t, softcap=float("inf")), sxt.cross_entropy(x, t))
    assert sx.cross_entropy(x.numpy(), t.numpy(), softcap=np.inf) == sx.cross_entropy(x.numpy(), t.numpy())


@pytest.mark.parametrize("softcap", [1e39, 1e31, 1e-31, 1e-45, 0.0, -1.0, float("nan"), float("-inf")])
def test_softcaps_outside_float32s_safe_range_are_refused(softcap):
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="softcap"):
        sxt.cross_entropy(x, t, softcap=softcap)
    with pytest.raises(ValueError, match="softcap"):
        sx.cross_entropy(x.numpy(), t.numpy(), softcap=softcap)
    with pytest.raises(ValueError, match="softcap"):
        sxt.linear_cross_entropy(x, torch.randn(4, 3), t, softcap=softcap)


@pytest.mark.parametrize("softcap", [1e-30, 1e30])
def test_softcaps_at_the_edges_of_the_range_give_finite_results(backend, softcap):
    x = (torch.randn(3, 6) * 100).requires_grad_()
    loss = sxt.cross_entropy(x, torch.tensor([0, 1, 5]), softcap=softcap)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


CASES = [([0.0, 1.0], [0, 0, 0]), ([1.0, -1.0], [0, 1, -100]), ([1.0, -1.0], [1, 0, -100])]


@pytest.mark.parametrize("weight, target", CASES)
def test_a_mean_whose_weights_sum_to_zero_divides_by_zero_as_pytorch(backend, weight, target):
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w, t = torch.tensor(weight, dtype=torch.float64), torch.tensor(target)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.cross_entropy(a, t, weight=w)
    ref.backward()
    ours = sxt.cross_entropy(b, t, weight=w)
    ours.backward()
    assert not torch.isfinite(ref)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    torch.testing.assert_close(b.grad, a.grad, equal_nan=True)
    loss, grad = sx.cross_entropy_grad(x.numpy(), t.numpy(), weight=w.numpy())
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref.item()))
    np.testing.assert_allclose(grad, a.grad.numpy(), equal_nan=True)


def test_linear_cross_entropy_with_weights_summing_to_zero_is_not_finite(backend):
    h, W = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    w, t = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([0, 1, -100])
    ref = F.cross_entropy(F.linear(h, W), t, weight=w)
    torch.testing.assert_close(sxt.linear_cross_entropy(h, W, t, weight=w), ref, equal_nan=True)
    loss = sx.linear_cross_entropy(h.numpy(), W.numpy(), t.numpy(), weight=w.numpy())
    assert not np.isfinite(loss) and np.isnan(loss) == np.isnan(ref.item())


def test_a_mean_over_only_ignored_samples_is_still_zero(backend):
    x = torch.randn(2, 3, requires_grad=True)
    loss = sxt.cross_entropy(x, torch.tensor([-100, -100]), weight=torch.tensor([0.0, 1.0, 2.0]))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.parametrize("bias", [False, True])
def test_a_layer_with_zero_features_gives_the_cross_entropy_of_its_bias(backend, bias):
    h = torch.zeros(4, 0, dtype=torch.float64, requires_grad=True)
    W = torch.zeros(5, 0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.tensor([0, 1, 4, -100])
    loss = sxt.linear_cross_entropy(h, W, t, linear_bias=b)
    loss.backward()
    logits = b.detach().expand(4, 5) if bias else torch.zeros(4, 5, dtype=torch.float64)
    torch.testing.assert_close(loss, F.cross_entropy(logits, t))
    assert h.grad.shape == (4, 0) and W.grad.shape == (5, 0)
    if bias:
        logits = logits.clone().requires_grad_()
        F.cross_entropy(logits, t).backward()
        torch.testing.assert_close(b.grad, logits.grad.sum(0))
    loss_np, dh, dW, db = sx.linear_cross_entropy_grad(
        h.detach().numpy(), W.detach().numpy(), t.numpy(), linear_bias=None if b is None else b.detach().numpy()
    )
    assert loss_np == pytest.approx(loss.item()) and dh.shape == (4, 0) and dW.shape == (5, 0)


def test_ignore_index_past_int64_is_refused_with_its_name():
    for call in (
        lambda: sxt.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=2**63),
        lambda: sx.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), ignore_index=-(2**63) - 1),
        lambda: sxt.CrossEntropyLoss(ignore_index=2**64)(
            torch.randn(2, 3), torch.tensor([0, 1])
        ),  # checked when called
    ):
        with pytest.raises(ValueError, match="ignore_index must fit in a signed 64-bit integer"):
            call()


def test_chunk_size_past_int64_is_one_chunk():
    h, W, t = torch.randn(6, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 4, 0])
    expected = sxt.linear_cross_entropy(h, W, t)
    torch.testing.assert_close(sxt.linear_cross_entropy(h, W, t, chunk_size=2**70), expected)
    assert sx.linear_cross_entropy(h.numpy(), W.numpy(), t.numpy(), chunk_size=2**64) == pytest.approx(expected.item())


@pytest.mark.skipif(np.dtype(np.longdouble) == np.dtype(np.float64), reason="longdouble is float64 here")
def test_longdouble_arrays_are_refused_with_the_arguments_name():
    z = np.zeros((2, 3), np.longdouble)
    for call, name in (
        (lambda: sx.cross_entropy(z, np.array([0, 1])), "logits"),
        (lambda: sx.cross_entropy(z.astype(np.float32), np.full((2, 3), 1 / 3, np.longdouble)), "target"),
        (lambda: sx.softmax(z), "z"),
        (lambda: sx.linear_cross_entropy(z, np.zeros((4, 3), np.float32), np.array([0, 1])), "hidden"),
    ):
        with pytest.raises(TypeError, match=f"{name} must have dtype float16, float32 or float64, got float128"):
            call()


def test_uint64_targets_past_int64_are_refused_under_torch_func_too():
    target = torch.tensor([0, 2**63 + 5], dtype=torch.uint64)
    with pytest.raises(ValueError, match="target contains class index 9223372036854775813"):
        torch.func.grad(lambda x: sxt.cross_entropy(x, target))(torch.zeros(2, 3))


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_zero_weights_with_label_smoothing_give_pytorchs_nan(backend, label_smoothing):
    # every counted target's weight is 0: PyTorch's smoothed mean is 0/0 + x/0 = NaN (not inf)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w, t = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([0, 1, -100, 0])
    kw = dict(weight=w, label_smoothing=label_smoothing)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.cross_entropy(a, t, **kw)
    ref.backward()
    ours = sxt.cross_entropy(b, t, **kw)
    ours.backward()
    assert torch.isnan(ref) and torch.isnan(ours)
    torch.testing.assert_close(b.grad, a.grad, equal_nan=True)
    composite = torch.func.grad(lambda z: sxt.cross_entropy(z, t, **kw))(x)
    torch.testing.assert_close(composite, a.grad, equal_nan=True)
    loss, grad = sx.cross_entropy_grad(x.numpy(), t.numpy(), weight=w.numpy(), label_smoothing=label_smoothing)
    assert np.isnan(loss)
    np.testing.assert_allclose(grad, a.grad.numpy(), equal_nan=True)
    h, W = torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    assert torch.isnan(sxt.linear_cross_entropy(h, W, t, **kw))
    assert np.isnan(sx.linear_cross_entropy(h.numpy(), W.numpy(), t.numpy(), **kw))


def test_zero_weights_with_label_smoothing_give_nan_in_jax():
    sxj = pytest.importorskip("softxent.jax")
    x = np.random.default_rng(0).normal(size=(4, 3))
    w, t = np.array([0.0, 0.0, 2.0]), np.array([0, 1, -100, 0])
    assert np.isnan(sxj.cross_entropy(x, t, weight=w, label_smoothing=0.1))
    assert np.isnan(sxj.cross_entropy(x, t, weight=w, label_smoothing=0.0))  # 0·inf: NaN as well, as PyTorch
