"""softxent.jax: the gradient with respect to the class ``weight`` (issue 20).

The loss is linear in w for a fixed denominator: ∂ℓ_i/∂w_k = (1−ε)·[t_i = k]·(−log p_{i,t_i})
+ (ε/C)·(−log p_ik) for a class index, ((1−ε)·q_ik + ε/C)·(−log p_ik) for probabilities; a
``mean`` over class indices divides by D = Σ_{i counted} w_{t_i}, which adds −(L/D)·n_k.  Every
reduction, both target kinds, label smoothing, z-loss, softcap, ignore_index and shift are
compared (float64) with ``jax.grad`` of a naive jnp composition, with finite differences,
under ``jit`` and ``vmap``, and with PyTorch where PyTorch differentiates the weight."""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'softxent[jax]')")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import softxent.jax as sxj  # noqa: E402

N, C, D = 7, 5, 4
RTOL = 1e-10


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _data(seed=0, n=N, c=C):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * 2.0
    y = rng.permutation(np.arange(n) % c)  # every class present
    y[[1, 4]] = -100  # ignored samples
    q = rng.random((n, c))
    q /= q.sum(1, keepdims=True)
    w = rng.uniform(0.3, 2.0, c)
    h = rng.standard_normal((n, D))
    lw = rng.standard_normal((c, D))
    lb = rng.standard_normal(c)
    g = rng.uniform(0.5, 1.5, n)  # upstream gradient of reduction="none"
    return {"z": z, "y": y, "q": q, "w": w, "h": h, "lw": lw, "lb": lb, "g": g}


def naive_cross_entropy(z, target, w, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                        ignore_index=-100):  # fmt: skip
    """The textbook composition, differentiated by plain JAX autodiff."""
    eps, num_classes = label_smoothing, z.shape[-1]
    zc = z if softcap is None else softcap * jnp.tanh(z / softcap)
    logp = jax.nn.log_softmax(zc, axis=-1)
    lse = jax.nn.logsumexp(zc, axis=-1)
    if jnp.issubdtype(jnp.asarray(target).dtype, jnp.integer):
        target = jnp.asarray(target)
        valid = jnp.ones(target.shape, bool) if ignore_index is None else target != ignore_index
        t = jnp.where(valid, target, 0)
        nll_t = -jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
        loss = (1 - eps) * w[t] * nll_t + eps / num_classes * jnp.sum(-logp * w, axis=-1) + z_loss * lse**2
        loss = jnp.where(valid, loss, 0.0)
        count = jnp.sum(valid)
        denom = jnp.sum(jnp.where(valid, w[t], 0.0))
    else:
        y = w * ((1 - eps) * target + eps / num_classes)
        loss = jnp.sum(-logp * y, axis=-1) + z_loss * lse**2
        count = loss.size
        denom = jnp.asarray(float(loss.size))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.where(count > 0, jnp.sum(loss) / jnp.where(count > 0, denom, 1.0), 0.0)


def _objective(fn, reduction, g):
    """A scalar J of the loss: Σ g_i·ℓ_i for "none", 0.7·loss otherwise."""
    if reduction == "none":
        return lambda *a: jnp.sum(jnp.asarray(g) * fn(*a))
    return lambda *a: 0.7 * fn(*a)


def _assert_close(got, want, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(want))
    scale = max(np.max(np.abs(want)), 1e-300)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _target(d, kind):
    return d["y"] if kind == "index" else d["q"]


REDUCTIONS = ["mean", "sum", "none"]
KINDS = ["index", "probabilities"]


def _check_against_naive(ours, naive, w, jit=False):
    """Value and weight gradient; ``jit`` for the chunked version (one compilation is cheaper
    than the eager scan's)."""
    value, got = (jax.jit if jit else lambda f: f)(jax.value_and_grad(ours))(w)
    want_value, want = jax.value_and_grad(naive)(w)
    _assert_close(value, want_value)
    assert np.any(np.asarray(got) != 0)
    _assert_close(got, want)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["no_zloss", "zloss"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_weight_gradient_equals_naive(reduction, kind, label_smoothing, z_loss):
    d = _data()
    z, target = jnp.asarray(d["z"]), _target(d, kind)
    opts = {"reduction": reduction, "label_smoothing": label_smoothing, "z_loss": z_loss}
    ours = _objective(lambda w: sxj.cross_entropy(z, target, weight=w, **opts), reduction, d["g"])
    naive = _objective(lambda w: naive_cross_entropy(z, target, w, **opts), reduction, d["g"])
    _check_against_naive(ours, naive, jnp.asarray(d["w"]))


# the chunked version compiles a scan per option set: z-loss (which does not depend on w) is on
# throughout, the cross_entropy matrix above checks it off and on
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_weight_gradient_equals_naive(reduction, kind, label_smoothing):
    d = _data(1)
    h, lw, lb, target = jnp.asarray(d["h"]), jnp.asarray(d["lw"]), jnp.asarray(d["lb"]), _target(d, kind)
    opts = {"reduction": reduction, "label_smoothing": label_smoothing, "z_loss": 1e-2}
    ours = _objective(
        lambda w: sxj.linear_cross_entropy(h, lw, target, linear_bias=lb, weight=w, chunk_size=3, **opts),
        reduction, d["g"],
    )  # fmt: skip
    naive = _objective(lambda w: naive_cross_entropy(h @ lw.T + lb, target, w, **opts), reduction, d["g"])
    _check_against_naive(ours, naive, jnp.asarray(d["w"]), jit=True)


OPTIONS = [
    {"softcap": 1.5},
    {"softcap": 1.5, "label_smoothing": 0.2, "z_loss": 1e-2},
    {"ignore_index": None},
    {"ignore_index": 3, "label_smoothing": 0.1},
]


def _options_case(options, kind, seed=2):
    if kind == "probabilities" and "ignore_index" in options:
        options = {k: v for k, v in options.items() if k != "ignore_index"}
    d = _data(seed)
    y = np.abs(d["y"]) % C if options.get("ignore_index", -100) != -100 else d["y"]
    return d, (y if kind == "index" else d["q"]), options


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_weight_gradient_with_softcap_and_ignore_index(options, kind, reduction):
    d, target, options = _options_case(options, kind)
    opts = {"reduction": reduction, **options}
    z = jnp.asarray(d["z"])
    ours = _objective(lambda w: sxj.cross_entropy(z, target, weight=w, **opts), reduction, d["g"])
    naive = _objective(lambda w: naive_cross_entropy(z, target, w, **opts), reduction, d["g"])
    _check_against_naive(ours, naive, jnp.asarray(d["w"]))


@pytest.mark.parametrize(
    "options,kind,reduction",
    [(OPTIONS[0], "index", "none"), (OPTIONS[1], "probabilities", "mean"), (OPTIONS[2], "index", "mean"),
     (OPTIONS[3], "index", "sum")],
    ids=["softcap-index-none", "softcap,eps,zloss-probabilities-mean", "ignore_index=None-index-mean",
         "ignore_index=3,eps-index-sum"],
)  # fmt: skip
def test_linear_cross_entropy_weight_gradient_with_softcap_and_ignore_index(options, kind, reduction):
    """Each chunk path (per-token backward for "none", the forward's scaled gradients otherwise)."""
    d, target, options = _options_case(options, kind)
    opts = {"reduction": reduction, **options}
    h, lw = jnp.asarray(d["h"]), jnp.asarray(d["lw"])
    ours = _objective(lambda w: sxj.linear_cross_entropy(h, lw, target, weight=w, chunk_size=4, **opts), reduction,
                      d["g"])  # fmt: skip
    naive = _objective(lambda w: naive_cross_entropy(h @ lw.T, target, w, **opts), reduction, d["g"])
    _check_against_naive(ours, naive, jnp.asarray(d["w"]), jit=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_gradient_with_shift(reduction):
    """cross_entropy for every reduction, linear_cross_entropy for "mean" (each compiles a scan)."""
    rng = np.random.default_rng(3)
    z, h, lw = rng.standard_normal((2, 6, C)), rng.standard_normal((2, 6, D)), rng.standard_normal((C, D))
    y = rng.integers(0, C, (2, 6))
    y[0, 2] = -100
    shifted = np.concatenate([y[:, 1:], np.full((2, 1), -100)], axis=1)
    g = rng.uniform(0.5, 1.5, (2, 6))
    w = jnp.asarray(rng.uniform(0.3, 2.0, C))
    opts = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2}
    cases = [(lambda w: sxj.cross_entropy(jnp.asarray(z), y, weight=w, shift=True, **opts), z)]
    if reduction == "mean":
        cases.append((lambda w: sxj.linear_cross_entropy(jnp.asarray(h), jnp.asarray(lw), y, weight=w, shift=True,
                                                         chunk_size=5, **opts), h @ lw.T))  # fmt: skip
    for ours, logits in cases:
        want = jax.grad(_objective(lambda w, x=logits: naive_cross_entropy(jnp.asarray(x), shifted, w, **opts),
                                   reduction, g))(w)  # fmt: skip
        _assert_close(jax.jit(jax.grad(_objective(ours, reduction, g)))(w), want)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_and_logit_gradients_together(kind):
    """argnums over logits and weight at once: the logits' gradient is unchanged, the weight's right."""
    d = _data(4)
    target = _target(d, kind)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    z, w = jnp.asarray(d["z"]), jnp.asarray(d["w"])
    got = jax.grad(lambda z, w: sxj.cross_entropy(z, target, weight=w, **opts), argnums=(0, 1))(z, w)
    want = jax.grad(lambda z, w: naive_cross_entropy(z, target, w, **opts), argnums=(0, 1))(z, w)
    for a, e in zip(got, want, strict=True):
        _assert_close(a, e)
    if kind != "index":  # the chunked version once (a compiled scan per call)
        return
    h, lw, lb = jnp.asarray(d["h"]), jnp.asarray(d["lw"]), jnp.asarray(d["lb"])
    got = jax.jit(jax.grad(
        lambda h, lw, lb, w: sxj.linear_cross_entropy(h, lw, target, linear_bias=lb, weight=w, chunk_size=2, **opts),
        argnums=(0, 1, 2, 3),
    ))(h, lw, lb, w)  # fmt: skip
    want = jax.grad(lambda h, lw, lb, w: naive_cross_entropy(h @ lw.T + lb, target, w, **opts),
                    argnums=(0, 1, 2, 3))(h, lw, lb, w)  # fmt: skip
    for a, e in zip(got, want, strict=True):
        _assert_close(a, e)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_finite_differences_on_the_weight(kind, reduction):
    d = _data(5, n=5, c=4)
    target = _target(d, kind)
    opts = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}
    z, w = jnp.asarray(d["z"]), jnp.asarray(d["w"])
    check_grads(lambda w: sxj.cross_entropy(z, target, weight=w, **opts), (w,), order=1, modes=["rev"])
    if (kind, reduction) == ("index", "mean"):  # the chunked version once, jitted
        h, lw = jnp.asarray(d["h"]), jnp.asarray(d["lw"])
        fn = jax.jit(lambda w: sxj.linear_cross_entropy(h, lw, target, weight=w, chunk_size=2, **opts))
        check_grads(fn, (w,), order=1, modes=["rev"])


@pytest.mark.parametrize("kind", KINDS)
def test_weight_gradient_under_jit_and_vmap(kind):
    d = _data(6)
    target = _target(d, kind)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2}
    z, h, lw = jnp.asarray(d["z"]), jnp.asarray(d["h"]), jnp.asarray(d["lw"])
    ws = jnp.asarray(np.random.default_rng(7).uniform(0.3, 2.0, (3, C)))
    ours = jax.grad(lambda w: sxj.cross_entropy(z, target, weight=w, **opts))
    naive = jax.grad(lambda w: naive_cross_entropy(z, target, w, **opts))
    _assert_close(jax.jit(ours)(ws[0]), naive(ws[0]))
    # vmap under jit (eager vmap compiles every batched operation on its own: slow, same code)
    _assert_close(jax.jit(jax.vmap(ours))(ws), jax.jit(jax.vmap(naive))(ws))
    # the chunked version: vmap under jit (one compilation)
    ours = jax.grad(lambda w: sxj.linear_cross_entropy(h, lw, target, weight=w, chunk_size=3, **opts))
    naive = jax.grad(lambda w: naive_cross_entropy(h @ lw.T, target, w, **opts))
    _assert_close(jax.jit(jax.vmap(ours))(ws), jax.jit(jax.vmap(naive))(ws))
    # a batch of logits (vmap over the rows' leading axis) with one shared, differentiated weight
    zs = jnp.stack([z, 2.0 * z, -z])
    ts = jnp.stack([jnp.asarray(target)] * 3)
    w = ws[1]
    got = jax.jit(
        jax.grad(lambda w: jnp.sum(jax.vmap(lambda x, t: sxj.cross_entropy(x, t, weight=w, **opts))(zs, ts)))
    )(w)
    want = jax.jit(jax.grad(lambda w: jnp.sum(jax.vmap(lambda x, t: naive_cross_entropy(x, t, w, **opts))(zs, ts))))(w)
    _assert_close(got, want)


def test_grad_variants_differentiate_the_weight():
    """``cross_entropy_grad`` / ``linear_cross_entropy_grad`` called inside a function of w."""
    d = _data(8)
    y, g = d["y"], d["g"]
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "reduction": "none"}
    z, h, lw = jnp.asarray(d["z"]), jnp.asarray(d["h"]), jnp.asarray(d["lw"])
    w = jnp.asarray(d["w"])
    proj = jnp.asarray(np.random.default_rng(9).standard_normal((N, C)))

    def naive_grad(w, x):
        return jax.grad(lambda x: jnp.sum(jnp.asarray(g) * naive_cross_entropy(x, y, w, **opts)))(x)

    got = jax.jit(jax.grad(lambda w: jnp.sum(sxj.cross_entropy_grad(z, y, weight=w, grad_output=g, **opts)[0])))(w)
    _assert_close(got, jax.grad(lambda w: jnp.sum(naive_cross_entropy(z, y, w, **opts)))(w))
    got = jax.jit(jax.grad(lambda w: jnp.vdot(proj, sxj.cross_entropy_grad(z, y, weight=w, grad_output=g, **opts)[1])))(
        w
    )
    _assert_close(got, jax.grad(lambda w: jnp.vdot(proj, naive_grad(w, z)))(w))
    # linear_cross_entropy_grad: its loss (its gradients are not differentiable: the chunk loop's
    # in-place buffers are while loops, which JAX cannot reverse-differentiate)
    got = jax.jit(jax.grad(
        lambda w: jnp.sum(sxj.linear_cross_entropy_grad(h, lw, y, weight=w, grad_output=g, chunk_size=3, **opts)[0])
    ))(w)  # fmt: skip
    _assert_close(got, jax.grad(lambda w: jnp.sum(naive_cross_entropy(h @ lw.T, y, w, **opts)))(w))


def test_weight_gradient_edge_cases():
    d = _data(11)
    z, w = jnp.asarray(d["z"]), jnp.asarray(d["w"])
    h, lw = jnp.asarray(d["h"]), jnp.asarray(d["lw"])
    # everything ignored: the mean is 0.0 and so is its gradient
    y = np.full(N, -100)
    for fn in (lambda w: sxj.cross_entropy(z, y, weight=w), lambda w: sxj.linear_cross_entropy(h, lw, y, weight=w)):
        np.testing.assert_array_equal(jax.grad(fn)(w), np.zeros(C))
    # zero weights, and a class no sample has
    w0 = w.at[0].set(0.0)
    y = np.abs(d["y"]) % (C - 1)
    for opts in ({}, {"label_smoothing": 0.1}):
        got = jax.grad(lambda w, o=opts: sxj.cross_entropy(z, y, weight=w, **o))(w0)
        _assert_close(got, jax.grad(lambda w, o=opts: naive_cross_entropy(z, y, w, **o))(w0))
    # ignored rows holding NaN logits do not reach the weight's gradient
    y = d["y"]
    zn = z.at[1].set(jnp.nan)
    got = jax.grad(lambda w: sxj.cross_entropy(zn, y, weight=w, label_smoothing=0.1))(w)
    assert np.all(np.isfinite(got))
    _assert_close(got, jax.grad(lambda w: naive_cross_entropy(z, y, w, label_smoothing=0.1))(w))
    # an index outside [0, C) under jit: NaN, never a wrong number
    bad = jnp.asarray(y).at[0].set(C + 2)
    got = jax.jit(jax.grad(lambda w, t: sxj.cross_entropy(z, t, weight=w, reduction="sum")))(w, bad)
    assert np.all(np.isnan(got))


def test_statistics_only_objective_differentiates_through_the_mean_denominator():
    """Only ``stats.z_loss`` is differentiated (the loss's cotangent is a symbolic zero): its
    1/D = 1/Σ w_t still depends on the weight."""
    d = _data(12)
    z, y, w = jnp.asarray(d["z"]), d["y"], jnp.asarray(d["w"])
    lam = 1e-2

    def naive(w):
        valid = y != -100
        t = np.where(valid, y, 0)
        lse = jax.nn.logsumexp(z, axis=-1)
        return lam * jnp.sum(jnp.where(valid, lse**2, 0.0)) / jnp.sum(jnp.where(valid, w[t], 0.0))

    got = jax.grad(lambda w: sxj.cross_entropy(z, y, weight=w, z_loss=lam, return_stats=True)[1].z_loss)(w)
    _assert_close(got, jax.grad(naive)(w))
    both = jax.grad(lambda w: sum(sxj.cross_entropy(z, y, weight=w, z_loss=lam, return_stats=True)[i] if i == 0
                                  else sxj.cross_entropy(z, y, weight=w, z_loss=lam, return_stats=True)[1].z_loss
                                  for i in range(2)))(w)  # fmt: skip
    want = jax.grad(lambda w: naive_cross_entropy(z, y, w, z_loss=lam) + naive(w))(w)
    _assert_close(both, want)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_gradient_equals_pytorch_for_probability_targets(reduction, label_smoothing):
    """PyTorch differentiates the weight for probability targets (its class-index path raises
    "not differentiable with respect to argument 'weight'"; there the naive jnp is the reference)."""
    torch = pytest.importorskip("torch")
    d = _data(13)
    z, q, g = d["z"], d["q"], d["g"]
    wt = torch.tensor(d["w"], requires_grad=True)
    loss = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(q), weight=wt, reduction=reduction,
                                             label_smoothing=label_smoothing)  # fmt: skip
    (torch.sum(torch.tensor(g) * loss) if reduction == "none" else 0.7 * loss).backward()
    ours = _objective(lambda w: sxj.cross_entropy(jnp.asarray(z), q, weight=w, reduction=reduction,
                                                  label_smoothing=label_smoothing), reduction, g)  # fmt: skip
    _assert_close(jax.grad(ours)(jnp.asarray(d["w"])), wt.grad.numpy())
