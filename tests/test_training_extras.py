"""Training extras on every API and backend: the causal-LM shift, the statistics of the pass
(z-loss term, token accuracy, per-token lse) and the num_items_in_batch recipe, against
PyTorch-composed references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent as sx
import softxent.torch as sxt
from softxent import InvalidArgumentError

V = 37


def _reference(logits, labels, *, shift, z_loss=0.0, softcap=None, label_smoothing=0.0, reduction="mean", weight=None):
    """(loss, z-loss term, accuracy, lse) of (B, T, V) logits composed from PyTorch ops."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    y = labels
    if shift:
        z, y = z[:, :-1], y[:, 1:]
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    counted = y != -100
    lse = torch.logsumexp(z, -1)
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(z, y, weight=w, label_smoothing=label_smoothing, reduction="none")
    zl = torch.where(counted, z_loss * lse**2, 0.0)
    denominator = counted.sum() if w is None else w[torch.where(counted, y, 0)][counted].sum()
    if reduction == "mean":
        loss, z_term = (ce.sum() + zl.sum()) / denominator, zl.sum() / denominator
    elif reduction == "sum":
        loss, z_term = ce.sum() + zl.sum(), zl.sum()
    else:
        loss, z_term = ce + zl, zl
    accuracy = ((z.argmax(-1) == y) & counted).sum() / counted.sum().clamp(min=1)
    return loss, z_term, accuracy, torch.where(counted, lse, 0.0)


def _data(seed=0, batch=3, length=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, V, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, V, (batch, length), generator=g)
    # make some predictions right (accuracy strictly between 0 and 1), one tie, one ignored label
    labels[:, 2:5] = logits[:, 1:4].argmax(-1)  # right when shifted
    labels[:, 6:8] = logits[:, 6:8].argmax(-1)  # right when not
    labels[0, 5] = -100
    logits[1, 7, :] = 0.5  # a tied row: torch.argmax picks class 0
    labels[1, 7:9] = 0
    return logits, labels


OPTIONS = [
    {},
    {"z_loss": 1e-3},
    {"softcap": 2.5, "label_smoothing": 0.1},
    {"reduction": "sum", "z_loss": 1e-2},
    {"weight": torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("shift", [False, True])
def test_torch_cross_entropy_stats_and_shift_match_pytorch(backend, options, shift):
    logits, labels = _data()
    want_loss, want_z, want_acc, want_lse = _reference(logits, labels, shift=shift, **options)
    assert 0.0 < float(want_acc) < 1.0
    x = logits.permute(0, 2, 1).contiguous().requires_grad_(True)  # (B, V, T): classes on dim 1
    loss, stats = sxt.cross_entropy(x, labels, shift=shift, return_stats=True, **options)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.z_loss.double(), want_z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.accuracy.double(), want_acc.double())
    assert stats.lse.shape == labels.shape and not stats.lse.requires_grad
    lse = stats.lse[:, :-1] if shift else stats.lse
    torch.testing.assert_close(lse.reshape(-1).double(), want_lse, rtol=1e-6, atol=1e-5)
    if shift:
        assert (stats.lse[:, -1] == 0).all()
    (grad,) = torch.autograd.grad(loss, x)
    ref_x = logits.permute(0, 2, 1).double().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(_reference(ref_x.permute(0, 2, 1), labels, shift=shift, **options)[0], ref_x)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    if shift:
        assert (grad[:, :, -1] == 0).all()  # the last position predicts nothing


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("shift", [False, True])
def test_torch_linear_cross_entropy_stats_and_shift_match_pytorch(backend, options, shift):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    logits = hidden.detach() @ w.detach().T
    _, labels = _data()
    labels[:, 2:5] = logits[:, 1:4].argmax(-1)
    loss, stats = sxt.linear_cross_entropy(hidden, w, labels, shift=shift, return_stats=True, chunk_size=5, **options)
    want_loss, want_z, want_acc, want_lse = _reference(logits, labels, shift=shift, **options)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.z_loss.double(), want_z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.accuracy.double(), want_acc.double())
    lse = stats.lse[:, :-1] if shift else stats.lse
    torch.testing.assert_close(lse.reshape(-1).double(), want_lse, rtol=1e-6, atol=1e-5)
    got = torch.autograd.grad(loss, (hidden, w))
    h64, w64 = hidden.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    want = torch.autograd.grad(_reference(h64 @ w64.T, labels, shift=shift, **options)[0], (h64, w64))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_shift_does_not_copy_the_logits_and_leaves_labels_alone():
    logits, labels = _data()
    before = labels.clone()
    x = logits.permute(0, 2, 1).contiguous()
    sxt.cross_entropy(x, labels, shift=True)
    assert torch.equal(labels, before)
    # a shifted loss of (B, V, T) equals the loss of the sliced logits
    torch.testing.assert_close(sxt.cross_entropy(x, labels, shift=True), F.cross_entropy(x[:, :, :-1], labels[:, 1:]))


def test_stats_with_reduction_none_and_probabilities(backend):
    logits, labels = _data()
    rows = logits.reshape(-1, V)
    probs = torch.softmax(torch.randn(rows.shape, generator=torch.Generator().manual_seed(5)), -1)
    loss, stats = sxt.cross_entropy(rows, probs, reduction="none", z_loss=1e-2, return_stats=True)
    lse = torch.logsumexp(rows, -1)
    torch.testing.assert_close(stats.z_loss, 1e-2 * lse**2)
    torch.testing.assert_close(stats.accuracy, ((rows.argmax(-1) == probs.argmax(-1)).float().mean()))
    assert loss.shape == stats.lse.shape == (rows.shape[0],)


def test_stats_of_an_all_ignored_or_empty_batch_are_zero(backend):
    logits = torch.randn(4, V, requires_grad=True)
    loss, stats = sxt.cross_entropy(logits, torch.full((4,), -100), z_loss=1e-3, return_stats=True)
    assert float(loss) == 0.0 and float(stats.accuracy) == 0.0 and float(stats.z_loss) == 0.0
    assert (stats.lse == 0).all()
    loss, stats = sxt.cross_entropy(torch.randn(0, V), torch.zeros(0, dtype=torch.long), return_stats=True)
    assert float(stats.accuracy) == 0.0 and stats.lse.shape == (0,)


def test_stats_report_nan_and_infinite_rows_as_torch(backend):
    logits = torch.randn(4, V)
    logits[0, 5] = float("nan")
    logits[1, 3] = logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    target = torch.tensor([5, 3, 0, 1])
    _, stats = sxt.cross_entropy(logits, target, reduction="none", return_stats=True)
    torch.testing.assert_close(stats.lse, torch.logsumexp(logits, -1), equal_nan=True)
    assert float(stats.accuracy) == float((logits.argmax(-1) == target).float().mean())


def test_stats_under_inplace_backward_and_torch_compile():
    logits, labels = _data()
    rows, y = logits.reshape(-1, V), labels.reshape(-1)
    _, want = sxt.cross_entropy(rows, y, return_stats=True, z_loss=1e-3)
    x = rows.clone().requires_grad_(True)
    loss, got = sxt.cross_entropy(x.clone(), y, return_stats=True, z_loss=1e-3, inplace_backward=True)
    loss.backward()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    compiled = torch.compile(lambda a, b: sxt.cross_entropy(a, b, return_stats=True, z_loss=1e-3), fullgraph=True)
    for a, b in zip(compiled(rows, y)[1], want, strict=True):
        torch.testing.assert_close(a, b)


def test_numpy_apis_match_the_torch_reference():
    logits, labels = _data(dtype=torch.float64)
    want_loss, want_z, want_acc, want_lse = _reference(logits, labels, shift=True, z_loss=1e-3)
    z, y = logits.numpy(), labels.numpy()
    loss, stats = sx.cross_entropy(z, y, shift=True, z_loss=1e-3, return_stats=True)
    loss2, grad, stats2 = sx.cross_entropy_grad(z, y, shift=True, z_loss=1e-3, return_stats=True)
    for got_loss, got in ((loss, stats), (loss2, stats2)):
        np.testing.assert_allclose(got_loss, want_loss.item(), rtol=1e-12)
        np.testing.assert_allclose(got.z_loss, want_z.item(), rtol=1e-12)
        assert got.accuracy == pytest.approx(want_acc.item())
        np.testing.assert_allclose(got.lse[:, :-1].reshape(-1), want_lse.numpy(), rtol=1e-12)
    assert not grad[:, -1].any()
    h = np.random.default_rng(0).standard_normal((3, 9, 8))
    w = np.random.default_rng(1).standard_normal((V, 8))
    want_loss, want_z, want_acc, want_lse = _reference(torch.from_numpy(h @ w.T), labels, shift=True, z_loss=1e-3)
    loss, stats = sx.linear_cross_entropy(h, w, y, shift=True, z_loss=1e-3, return_stats=True, chunk_size=4)
    *_, stats_g = sx.linear_cross_entropy_grad(h, w, y, shift=True, z_loss=1e-3, return_stats=True, chunk_size=4)
    np.testing.assert_allclose(loss, want_loss.item(), rtol=1e-12)
    for got in (stats, stats_g):
        np.testing.assert_allclose(got.z_loss, want_z.item(), rtol=1e-12)
        assert got.accuracy == pytest.approx(want_acc.item())


def test_num_items_in_batch_recipe_matches_transformers_normalization():
    """Gradient accumulation as transformers does it: Σ over micro-batches of sum-losses / total count."""
    logits, labels = _data()
    x = logits.permute(0, 2, 1)
    total_items = int((labels[:, 1:] != -100).sum())
    accumulated = sum(
        sxt.cross_entropy(x[i : i + 1], labels[i : i + 1], shift=True, reduction="sum") / total_items for i in range(3)
    )
    torch.testing.assert_close(accumulated, F.cross_entropy(x[:, :, :-1], labels[:, 1:]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: sxt.cross_entropy(torch.randn(4, 3), torch.rand(4, 3), shift=True),
        lambda: sxt.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), shift=True, ignore_index=None),
        lambda: sxt.cross_entropy(torch.randn(3), torch.tensor(1), shift=True),
        lambda: sxt.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), shift=1),
        lambda: sx.cross_entropy(np.zeros((4, 3)), np.zeros((4, 3)), shift=True),
        lambda: sxt.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), torch.rand(4, 3), shift=True),
        lambda: sxt.cross_entropy(torch.randn(4, 0), torch.full((4,), -100), return_stats=True),
    ],
)
def test_bad_extras_raise_a_clear_error(call):
    with pytest.raises(InvalidArgumentError, match="shift|return_stats"):
        call()
