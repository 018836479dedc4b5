"""torch.func transforms around ``torch.autograd.grad`` of a loss built outside them, and targets made
under ``torch.inference_mode()``: PyTorch's values (found by an autograd probe)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap

import softxent.torch as sxt

X = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
H = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
W = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
T = torch.tensor([0, 2, 1])
Q = torch.softmax(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 1)


def _graph(lib, case, reduction):
    """(loss, the leaf it is differentiated against), built outside any transform."""
    if case == "linear":
        h = H.clone().requires_grad_()
        if lib is sxt:
            return sxt.linear_cross_entropy(h, W, T, reduction=reduction), h
        return F.cross_entropy(h @ W.T, T, reduction=reduction), h
    x = X.clone().requires_grad_()
    target = Q if case == "probabilities" else T
    return lib.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1), x


CASES = ["index", "probabilities", "linear"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
def test_vmap_over_autograd_grad(case, reduction):
    outs = []
    for lib in (F, sxt):
        loss, leaf = _graph(lib, case, reduction)
        upstream = torch.randn((5, *loss.shape), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        outs.append(vmap(lambda u, loss=loss, leaf=leaf: torch.autograd.grad(loss, leaf, u)[0])(upstream))
    torch.testing.assert_close(outs[1], outs[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("transform", ["jvp", "vjp"])
@pytest.mark.parametrize("case", CASES)
def test_jvp_and_vjp_over_autograd_grad(case, transform, reduction):
    outs = []
    for lib in (F, sxt):
        loss, leaf = _graph(lib, case, reduction)
        u0 = torch.full(loss.shape, 0.7, dtype=torch.float64)

        def f(u, loss=loss, leaf=leaf):
            return torch.autograd.grad(loss, leaf, u, retain_graph=True)[0]

        if transform == "jvp":
            outs.append(jvp(f, (u0,), (torch.ones_like(u0),))[1])
        else:
            outs.append(vjp(f, u0)[1](torch.ones_like(leaf))[0])
    torch.testing.assert_close(outs[1], outs[0])


def test_the_saved_gradient_is_still_scaled_in_place_without_a_transform():
    # the plain path keeps its in-place scaling: the buffer handed back is the one saved
    x = X.clone().requires_grad_()
    loss = sxt.cross_entropy(x, T)
    (g,) = torch.autograd.grad(loss, x, torch.tensor(2.0, dtype=torch.float64))
    ref = X.clone().requires_grad_()
    (r,) = torch.autograd.grad(F.cross_entropy(ref, T), ref, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(g, r)


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.3}, {"weight": "w"}, {"weight": "w-grad"}], ids=["plain", "ls", "w", "w-grad"]
)
def test_a_target_made_in_inference_mode_trains(options):
    with torch.inference_mode():
        q = torch.softmax(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), 1)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    if "weight" in options:
        options = {"weight": w.clone().requires_grad_(options["weight"] == "w-grad")}
    x = X.clone().requires_grad_()
    loss = sxt.cross_entropy(x, q, **options)
    weight = options.get("weight")
    wanted = [x] + ([weight] if weight is not None and weight.requires_grad else [])
    got = torch.autograd.grad(loss, wanted)
    # PyTorch's values, with a normal copy of the target (PyTorch itself refuses some of these)
    ref_options = {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
                   for k, v in options.items()}  # fmt: skip
    xr = X.clone().requires_grad_()
    ref_loss = F.cross_entropy(xr, q.clone(), **ref_options)
    ref_wanted = [xr] + ([ref_options["weight"]] if len(wanted) == 2 else [])
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(got, torch.autograd.grad(ref_loss, ref_wanted), strict=True):
        torch.testing.assert_close(a, b)
    assert q.is_inference()  # the caller's tensor is untouched


def test_jvp_over_autograd_grad_of_linear_with_bias_ignored_tokens_and_options():
    b = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, -100, 3])
    options = {"reduction": "none", "label_smoothing": 0.2, "z_loss": 1e-2}
    outs = []
    for lib in ("torch", "softxent"):
        h, w, bias = (v.clone().requires_grad_() for v in (H, W, b))
        if lib == "softxent":
            loss = sxt.linear_cross_entropy(h, w, t, linear_bias=bias, **options)
        else:
            z = h @ w.T + bias
            lse = torch.logsumexp(z, 1)
            loss = F.cross_entropy(z, t, reduction="none", label_smoothing=0.2) + 1e-2 * lse**2 * (t != -100)
        u0 = torch.full(loss.shape, 0.7, dtype=torch.float64)

        def f(u, loss=loss, leaves=(h, w, bias)):
            return torch.autograd.grad(loss, leaves, u, retain_graph=True)

        outs.append(jvp(f, (u0,), (torch.arange(3.0, dtype=torch.float64),))[1])
    for ours, ref in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_softmax_family_backward_under_jvp_and_vmap_of_autograd_grad(name):
    outs = []
    for lib in (torch, sxt):
        x = X.clone().requires_grad_()
        y = getattr(lib, name)(x, 1)
        u0 = torch.full(y.shape, 0.7, dtype=torch.float64)
        du = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

        def f(u, y=y, x=x):
            return torch.autograd.grad(y, x, u, retain_graph=True)[0]

        outs.append((jvp(f, (u0,), (du,))[1], vmap(f)(torch.stack([u0, du]))))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_linear_distill_under_jvp_of_autograd_grad_is_exact_or_refused(reduction):
    h = H.clone().requires_grad_()
    teacher = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    loss = sxt.linear_distill_loss(h, W, teacher, reduction=reduction)
    u0 = torch.full(loss.shape, 0.7, dtype=torch.float64)

    def f(u):
        return torch.autograd.grad(loss, h, u, retain_graph=True)[0]

    if reduction == "none":  # never the silent zero tangent of the op's rerun
        with pytest.raises(NotImplementedError, match="reduction='none' is not supported"):
            jvp(f, (u0,), (torch.ones_like(u0),))
    else:
        torch.testing.assert_close(jvp(f, (u0,), (torch.ones_like(u0),))[1], f(torch.ones_like(u0)))


def test_class_weights_and_teachers_made_in_inference_mode_train_the_fused_linear_losses():
    h = H.clone().requires_grad_()
    with torch.inference_mode():
        w = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5
        teacher = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    (g,) = torch.autograd.grad(sxt.linear_cross_entropy(h, W, T, weight=w), h)
    ref = H.clone().requires_grad_()
    torch.testing.assert_close(g, torch.autograd.grad(F.cross_entropy(ref @ W.T, T, weight=w.clone()), ref)[0])
    (g,) = torch.autograd.grad(sxt.linear_distill_loss(h, W, teacher, reduction="none").sum(), h)
    (r,) = torch.autograd.grad(sxt.distill_loss(ref @ W.T, teacher.clone(), reduction="none").sum(), ref)
    torch.testing.assert_close(g, r)


def test_vmap_over_autograd_grad_of_linear_cross_entropy_with_respect_to_class_weights():
    q = Q.clone()
    outs = []
    for lib in ("torch", "softxent"):
        h, w = H.clone().requires_grad_(), torch.linspace(0.5, 2.0, 4, dtype=torch.float64).requires_grad_()
        if lib == "softxent":
            loss = sxt.linear_cross_entropy(h, W, q, weight=w, reduction="none")
        else:
            loss = F.cross_entropy(h @ W.T, q, weight=w, reduction="none")
        upstream = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
        outs.append(vmap(lambda u, loss=loss, w=w: torch.autograd.grad(loss, w, u, retain_graph=True)[0])(upstream))
    torch.testing.assert_close(outs[1], outs[0])
