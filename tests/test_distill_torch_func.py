"""torch.func transforms (grad, vmap, jvp, jacrev) and forward-mode AD over the distillation
losses: they run a composite of PyTorch ops, checked here against the fused ops (themselves
checked against the float64 reference) — values, gradients, directional derivatives and
statistics, for every teacher kind and divergence."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import softxent.torch as sxt

B, N, V, D, DT, K = 2, 5, 9, 4, 3, 3

OPTIONS = [
    {},
    {"divergence": "reverse_kl", "temperature": 2.0},
    {"divergence": "jsd", "beta": 0.3, "alpha": 0.2},
    {"alpha": 0.3, "temperature": 1.5, "temperature_scaling": False, "reduction": "none"},
    {"reduction": "sum", "shift": True},
    {"divergence": "jsd", "topk_rest": "ignore", "alpha": 0.5},
]


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, V, dtype=torch.float64, generator=g)
    teacher = torch.randn(B, N, V, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[0, 2] = -100
    top = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    return x, teacher, labels, sxt.TopK(top.indices, top.values)


def _teachers(kind, teacher, topk):
    return teacher if kind == "dense" else topk


def _fused_value_and_grad(fn, x):
    x = x.clone().requires_grad_()
    loss = fn(x)
    return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_grad_jvp_and_forward_ad_match_the_fused_op(options, kind):
    x, teacher, labels, topk = _problem()
    t = _teachers(kind, teacher, topk)

    def fn(z):
        return sxt.distill_loss(z, t, labels, **options)

    want, want_grad = _fused_value_and_grad(fn, x)
    torch.testing.assert_close(torch.func.grad(lambda z: fn(z).sum())(x), want_grad)
    v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    value, tangent = torch.func.jvp(fn, (x,), (v,))
    torch.testing.assert_close(value, want)
    # ⟨∇(Σ loss·u), v⟩ for the jvp of each output entry: the jvp of the sum is ⟨∇Σ, v⟩
    torch.testing.assert_close(tangent.sum(), (want_grad * v).sum())
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, v))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, tangent)


@pytest.mark.parametrize("options", [o for o in OPTIONS if not o.get("shift")], ids=str)
def test_vmap_over_sequences_matches_one_call_per_sequence(options):
    x, teacher, labels, topk = _problem()
    batched = torch.vmap(lambda z, t, y: sxt.distill_loss(z, t, y, **options))(x, teacher, labels)
    one_by_one = torch.stack([sxt.distill_loss(x[i], teacher[i], labels[i], **options) for i in range(B)])
    torch.testing.assert_close(batched, one_by_one)
    grads = torch.vmap(torch.func.grad(lambda z, t, y: sxt.distill_loss(z, t, y, **options).sum()))(x, teacher, labels)
    for i in range(B):
        one = _fused_value_and_grad(lambda z, i=i: sxt.distill_loss(z, teacher[i], labels[i], **options), x[i])[1]
        torch.testing.assert_close(grads[i], one)
    jac = torch.func.jacrev(lambda z: sxt.distill_loss(z, topk, labels, **options))(x)
    assert jac.shape == (B, N, B, N, V) if options.get("reduction") == "none" else jac.shape == x.shape


@pytest.mark.parametrize("options", OPTIONS[:4], ids=str)
@pytest.mark.parametrize("kind", ["dense", "topk", "fused"])
def test_linear_distill_under_torch_func_matches_the_fused_op(options, kind):
    _, teacher, labels, topk = _problem()
    g = torch.Generator().manual_seed(2)
    h = torch.randn(B, N, D, dtype=torch.float64, generator=g)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g)
    fused = sxt.FusedTeacher(
        torch.randn(B, N, DT, dtype=torch.float64, generator=g), torch.randn(V, DT, dtype=torch.float64, generator=g)
    )
    t = {"dense": teacher, "topk": topk, "fused": fused}[kind]

    def fn(hh, ww):
        return sxt.linear_distill_loss(hh, ww, t, labels, student_bias=b, chunk_size=3, **options)

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = fn(hh, ww)
    want_grads = torch.autograd.grad(want.sum(), (hh, ww))
    got = torch.func.grad(lambda a, c: fn(a, c).sum(), argnums=(0, 1))(h, w)
    for a, c in zip(got, want_grads, strict=True):
        torch.testing.assert_close(a, c)
    value, tangent = torch.func.jvp(lambda a: fn(a, w), (h,), (torch.ones_like(h),))
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(tangent.sum(), want_grads[0].sum())


def test_statistics_of_the_composite_path_match_the_fused_op():
    x, teacher, labels, topk = _problem()
    for t in (teacher, topk):
        loss, stats = sxt.distill_loss(x, t, labels, return_stats=True)
        with fwAD.dual_level():  # forward-mode AD runs the composite path
            dual_loss, dual_stats = sxt.distill_loss(
                fwAD.make_dual(x, torch.ones_like(x)), t, labels, return_stats=True
            )
            torch.testing.assert_close(fwAD.unpack_dual(dual_loss).primal, loss)
        torch.testing.assert_close(dual_stats.divergence, stats.divergence)
        torch.testing.assert_close(dual_stats.agreement, stats.agreement)
    per_sequence = torch.vmap(lambda z, y: sxt.distill_loss(z, teacher[0], y, return_stats=True)[1].divergence)(
        x, labels
    )
    for i in range(B):
        want = sxt.distill_loss(x[i], teacher[0], labels[i], return_stats=True)[1].divergence
        torch.testing.assert_close(per_sequence[i], want)


@pytest.mark.parametrize("kind", ["dense", "topk", "fused"])
def test_double_backward_of_the_linear_form_matches_the_composite(kind):
    _, teacher, labels, topk = _problem()
    g = torch.Generator().manual_seed(5)
    h = torch.randn(B, N, D, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True)
    fused = sxt.FusedTeacher(
        torch.randn(B, N, DT, dtype=torch.float64, generator=g), torch.randn(V, DT, dtype=torch.float64, generator=g)
    )
    t = {"dense": teacher, "topk": topk, "fused": fused}[kind]
    options = {"divergence": "jsd", "alpha": 0.2, "temperature": 2.0}
    results = []
    for composite in (False, True):
        if composite:  # forward-mode AD's dual level makes softxent take its composite path
            with fwAD.dual_level():
                loss = sxt.linear_distill_loss(
                    fwAD.make_dual(h, torch.zeros_like(h)), w, t, labels, student_bias=b, **options
                )
                loss = fwAD.unpack_dual(loss).primal
        else:
            loss = sxt.linear_distill_loss(h, w, t, labels, student_bias=b, chunk_size=3, **options)
        first = torch.autograd.grad(loss, (h, w, b), create_graph=True)
        second = torch.autograd.grad(sum((x.sin()).sum() for x in first), (h, w, b))
        results.append((loss, *first, *second))
    for ours, composite in zip(*results, strict=True):
        torch.testing.assert_close(ours, composite)
