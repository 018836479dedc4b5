"""``torch.vmap`` (and ``torch.func.grad`` through it) over softxent's PyTorch functions: the same
values and gradients as over PyTorch's, and the same clear errors for bad class indices."""

import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt
from softxent import TargetIndexError

B, N, C, D = 3, 5, 7, 4


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, dtype=torch.float64, generator=g)
    t = torch.randint(0, C, (B, N), generator=g)
    t[0, 1] = -100
    q = torch.softmax(torch.randn(B, N, C, dtype=torch.float64, generator=g), -1)
    w = torch.rand(C, dtype=torch.float64, generator=g) + 0.1
    return x, t, q, w


def _assert_same_under_vmap_and_grad(ours, theirs, *args):
    torch.testing.assert_close(torch.vmap(ours)(*args), torch.vmap(theirs)(*args))
    got = torch.func.grad(lambda a, *rest: torch.vmap(ours)(a, *rest).sum())(*args)
    want = torch.func.grad(lambda a, *rest: torch.vmap(theirs)(a, *rest).sum())(*args)
    torch.testing.assert_close(got, want)


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"weight": True, "label_smoothing": 0.2, "reduction": "none"},
    {"weight": True},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_cross_entropy_under_vmap_matches_pytorch(opts, kind):
    x, t, q, w = _inputs()
    kw = dict(opts, weight=w) if opts.get("weight") else opts
    target = t if kind == "indices" else q
    _assert_same_under_vmap_and_grad(
        lambda a, b: sxt.cross_entropy(a, b, **kw), lambda a, b: F.cross_entropy(a, b, **kw), x, target
    )


def test_cross_entropy_extras_under_vmap():
    x, t, _, _ = _inputs()
    counted = t != -100

    def with_z_loss(a, b):
        lse = torch.logsumexp(a, -1)
        return F.cross_entropy(a, b) + 1e-2 * torch.where(b != -100, lse**2, 0).sum() / (b != -100).sum()

    _assert_same_under_vmap_and_grad(lambda a, b: sxt.cross_entropy(a, b, z_loss=1e-2), with_z_loss, x, t)
    _assert_same_under_vmap_and_grad(
        lambda a, b: sxt.cross_entropy(a, b, shift=True), lambda a, b: F.cross_entropy(a[:-1], b[1:]), x, t
    )
    loss, stats = torch.vmap(lambda a, b: sxt.cross_entropy(a, b, return_stats=True))(x, t)
    torch.testing.assert_close(loss, torch.vmap(F.cross_entropy)(x, t))
    hits = (x.argmax(-1) == t) & counted
    torch.testing.assert_close(stats.accuracy, hits.sum(-1).float() / counted.sum(-1))
    torch.testing.assert_close(stats.lse, torch.where(counted, torch.logsumexp(x, -1), 0.0))


@pytest.mark.parametrize("fn", ["softmax", "log_softmax", "logsumexp"])
def test_softmax_family_under_vmap(fn):
    x = _inputs()[0]
    ref = torch.logsumexp if fn == "logsumexp" else getattr(F, fn)
    _assert_same_under_vmap_and_grad(lambda a: getattr(sxt, fn)(a, -1), lambda a: ref(a, -1), x)


@pytest.mark.parametrize("return_stats", [False, True])
def test_linear_cross_entropy_under_vmap_matches_pytorch(return_stats):
    x, t, _, _ = _inputs()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, N, D, dtype=torch.float64, generator=g)
    lw = torch.randn(C, D, dtype=torch.float64, generator=g)
    bias = torch.randn(C, dtype=torch.float64, generator=g)

    def ours(a, b):
        out = sxt.linear_cross_entropy(a, lw, b, linear_bias=bias, label_smoothing=0.1, return_stats=return_stats)
        return out[0] if return_stats else out

    _assert_same_under_vmap_and_grad(ours, lambda a, b: F.cross_entropy(a @ lw.T + bias, b, label_smoothing=0.1), h, t)
    # the layer's own gradient through vmap over a batch of sequences
    got = torch.func.grad(lambda w: torch.vmap(lambda a, b: sxt.linear_cross_entropy(a, w, b))(h, t).sum())(lw)
    want = torch.func.grad(lambda w: torch.vmap(lambda a, b: F.cross_entropy(a @ w.T, b))(h, t).sum())(lw)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", [C, -1])
def test_a_bad_class_index_under_vmap_raises_a_clear_error(bad):
    x, t, _, _ = _inputs()
    t = t.clone()
    t[2, 3] = bad
    with pytest.raises(TargetIndexError, match=f"class index {bad}"):
        torch.vmap(sxt.cross_entropy)(x, t)
    h = torch.randn(B, N, D, dtype=torch.float64)
    lw = torch.randn(C, D, dtype=torch.float64)
    with pytest.raises(TargetIndexError, match=f"class index {bad}"):
        torch.vmap(lambda a, b: sxt.linear_cross_entropy(a, lw, b))(h, t)
    huge = t.clone()
    huge[2, 3] = -1  # as uint64 (as is -100): ≥ 2**63, which a conversion to int64 would wrap
    with pytest.raises(TargetIndexError, match="class index 184467440737095515"):
        torch.vmap(sxt.cross_entropy)(x, huge.view(torch.uint64))


def test_torch_compile_fullgraph_of_transforms_over_class_index_losses():
    # the index check reads values on the host; while Dynamo traces it is skipped, so fullgraph holds
    x, t, _, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, N, D, dtype=torch.float64, generator=g)
    lw = torch.randn(C, D, dtype=torch.float64, generator=g)
    cases = [
        (lambda a, b: torch.func.grad(lambda u: sxt.linear_cross_entropy(u, lw, b))(a), h),
        (lambda a, b: torch.vmap(sxt.cross_entropy)(a, b), x),
    ]
    for fn, arg in cases:
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(arg, t), fn(arg, t))
    torch._dynamo.reset()
