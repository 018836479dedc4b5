"""The class weights' gradient with probability targets, which PyTorch computes (with class
indices it refuses, and so does softxent): cross_entropy in every layout and reduction, the
in-place variant, and linear_cross_entropy, against PyTorch and float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt

C = 7


def _probabilities(shape, class_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    q = torch.softmax(torch.randn(shape, dtype=torch.float64, generator=g), class_dim)
    return x, q


def _weight():
    return torch.linspace(0.5, 2.0, C, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("shape", [(C,), (5, C), (2, C, 3)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2}], ids=str)
def test_cross_entropy_class_weight_gradient_matches_pytorch(backend, shape, reduction, options):
    x, q = _probabilities(shape, 0 if len(shape) == 1 else 1)
    results, upstream = [], None
    for fn in (F.cross_entropy, sxt.cross_entropy):
        w, xg, qg = _weight(), x.clone().requires_grad_(), q.clone().requires_grad_()
        loss = fn(xg, qg, weight=w, reduction=reduction, **options)
        upstream = torch.randn_like(loss) if upstream is None else upstream
        results.append((loss, *torch.autograd.grad(loss, (xg, qg, w), upstream)))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs)


def test_cross_entropy_class_weight_gradcheck_with_every_option():
    x, q = _probabilities((4, C), 1)

    def loss(w):
        return sxt.cross_entropy(x, q, weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=2.0, reduction="none")

    assert torch.autograd.gradcheck(loss, (_weight(),))


def test_in_place_backward_still_gives_the_class_weight_gradient():
    x, q = _probabilities((5, C), 1)
    w_ref, w = _weight(), _weight()
    F.cross_entropy(x, q, weight=w_ref).backward()
    z = x.clone().requires_grad_()
    sxt.cross_entropy(z * 1.0, q, weight=w, inplace_backward=True).backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_linear_cross_entropy_class_weight_gradient_matches_pytorch(reduction, chunk_size):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    lw = torch.randn(C, 3, dtype=torch.float64, generator=g)
    bias = torch.randn(C, dtype=torch.float64, generator=g)
    q = torch.softmax(torch.randn(2, 5, C, dtype=torch.float64, generator=g), -1)
    results, upstream = [], None
    for ours in (False, True):
        w, hg, lwg = _weight(), h.clone().requires_grad_(), lw.clone().requires_grad_()
        if ours:
            loss = sxt.linear_cross_entropy(
                hg, lwg, q, linear_bias=bias, weight=w, reduction=reduction, label_smoothing=0.1, chunk_size=chunk_size
            )
        else:
            loss = F.cross_entropy(
                (hg @ lwg.T + bias).reshape(-1, C), q.reshape(-1, C), weight=w, reduction=reduction, label_smoothing=0.1
            )
            loss = loss.reshape(2, 5) if reduction == "none" else loss
        upstream = torch.randn_like(loss) if upstream is None else upstream
        results.append((loss, *torch.autograd.grad(loss, (hg, lwg, w), upstream)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda w: sxt.linear_cross_entropy(h, lw, q, weight=w, softcap=1.5), (_weight(),))


def test_forward_mode_ad_through_the_class_weight_of_both_losses():
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 3, dtype=torch.float64, generator=g)
    lw = torch.randn(C, 3, dtype=torch.float64, generator=g)
    q = torch.softmax(torch.randn(4, C, dtype=torch.float64, generator=g), -1)
    w, dw = torch.rand(C, dtype=torch.float64, generator=g), torch.randn(C, dtype=torch.float64, generator=g)
    tangents = []
    with fwAD.dual_level():
        for loss in (
            lambda wd: F.cross_entropy(h @ lw.T, q, weight=wd, label_smoothing=0.1),
            lambda wd: sxt.cross_entropy(h @ lw.T, q, weight=wd, label_smoothing=0.1),
            lambda wd: sxt.linear_cross_entropy(h, lw, q, weight=wd, label_smoothing=0.1),
        ):
            tangents.append(fwAD.unpack_dual(loss(fwAD.make_dual(w, dw))).tangent)
    assert tangents[0] is not None
    for t in tangents[1:]:
        torch.testing.assert_close(t, tangents[0])
