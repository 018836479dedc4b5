"""softxent.linear_cross_entropy(_grad) (NumPy) against naive float64 autograd, finite differences, bad input."""

import itertools

import numpy as np
import pytest
import torch

import softxent as sx
from softxent._gradcheck import numerical_gradient
from torch_reference import reference_linear_loss

OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3, "softcap": 2.5},
    {"ignore_index": None},
    {"weight": "w", "label_smoothing": 0.2},
    {"weight": "w", "reduction": "sum", "z_loss": 1e-3},
]


def _problem(lead, d, v, kind, seed=0, ignored=0.2):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(*lead, d))
    w = rng.normal(size=(v, d)) / np.sqrt(d)
    b = rng.normal(size=v)
    if kind == "index":
        t = rng.integers(0, v, size=lead)
        t[rng.random(lead) < ignored] = -100
    else:
        t = rng.dirichlet(np.ones(v), size=lead)
    return h, w, b, t, rng.random(v) + 0.5


def _reference(h, w, t, b, grad_output=None, **options):
    """(loss, dh, dW, db) in float64 from F.linear + F.cross_entropy (+ z-loss, softcap) autograd."""
    H, W = torch.tensor(h, requires_grad=True), torch.tensor(w, requires_grad=True)
    B = None if b is None else torch.tensor(b, requires_grad=True)
    T = torch.tensor(t)
    if options.get("weight") is not None:
        options["weight"] = torch.tensor(options["weight"])
    loss = reference_linear_loss(H, W, T, B, **options)
    upstream = torch.ones_like(loss) if grad_output is None else torch.tensor(grad_output)
    leaves = [H, W] + ([] if B is None else [B])
    if loss.numel() and h.size:
        grads = torch.autograd.grad(loss, leaves, upstream, allow_unused=True)
        grads = [np.zeros(x.shape) if g is None else g.numpy() for g, x in zip(grads, leaves, strict=True)]
    else:
        grads = [np.zeros(x.shape) for x in leaves]
    return (loss.detach().numpy(), *grads, None) if B is None else (loss.detach().numpy(), *grads)


@pytest.mark.parametrize(
    "options,kind,lead,chunk",
    [
        (options, kind, lead, chunk)
        for options, kind, lead, chunk in itertools.product(OPTIONS, ["index", "probs"], [(23,), (2, 5)], [None, 4])
        if kind == "index" or "ignore_index" not in options  # ignore_index applies to class indices only
    ],
)
def test_matches_naive_float64_autograd(options, kind, lead, chunk):
    h, w, b, t, cw = _problem(lead, 7, 19, kind, ignored=0.2 if "ignore_index" not in options else 0.0)
    opts = {k: (cw if v == "w" else v) for k, v in options.items()}
    grad_output = None
    if opts.get("reduction") == "none":
        grad_output = np.random.default_rng(1).normal(size=lead)
    got = sx.linear_cross_entropy_grad(h, w, t, linear_bias=b, grad_output=grad_output, chunk_size=chunk, **opts)
    want = _reference(h, w, t, b, grad_output=grad_output, **opts)
    for name, g, r in zip(["loss", "dhidden", "dweight", "dbias"], got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13, err_msg=name)
    loss_only = sx.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=chunk, **opts)
    np.testing.assert_allclose(loss_only, want[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "lead,d,v,chunk",
    [
        ((1,), 5, 3, None),  # N = 1
        ((17,), 4, 1, None),  # V = 1: loss 0, gradient 0
        ((17,), 4, 2, 3),  # V = 2, N not divisible by the chunk
        ((64,), 3, 257, 10),  # V not a multiple of anything
        ((), 6, 11, None),  # a single hidden vector (D,), target ()
        ((3, 4), 5, 9, 5),  # leading dimensions
    ],
)
def test_shapes(lead, d, v, chunk):
    h, w, b, t, _ = _problem(lead, d, v, "index", seed=3, ignored=0.0)
    got = sx.linear_cross_entropy_grad(h, w, t, linear_bias=b, chunk_size=chunk)
    want = _reference(h, w, t, b)
    assert got[1].shape == h.shape and got[2].shape == w.shape and got[3].shape == b.shape
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)


def test_without_bias_returns_none_for_its_gradient():
    h, w, _, t, _ = _problem((9,), 4, 6, "index")
    loss, dh, dw, db = sx.linear_cross_entropy_grad(h, w, t)
    assert db is None
    want = _reference(h, w, t, None)
    np.testing.assert_allclose(dw, want[2], rtol=1e-10, atol=1e-13)


def test_all_ignored_and_empty_batches_give_zero_loss_and_zero_gradients():
    h, w, b, _, _ = _problem((5,), 4, 6, "index")
    t = np.full(5, -100)
    loss, dh, dw, db = sx.linear_cross_entropy_grad(h, w, t, linear_bias=b)
    assert loss == 0.0 and not dh.any() and not dw.any() and not db.any()
    loss, dh, dw, db = sx.linear_cross_entropy_grad(np.zeros((0, 4)), w, np.zeros(0, int), linear_bias=b)
    assert loss == 0.0 and dh.shape == (0, 4) and not dw.any() and not db.any()
    none = sx.linear_cross_entropy(np.zeros((0, 4)), w, np.zeros(0, int), reduction="none")
    assert none.shape == (0,)


def test_ignored_tokens_cost_no_work_and_get_zero_rows():
    h, w, b, t, _ = _problem((12,), 4, 6, "index", ignored=0.5)
    h[t == -100] = np.nan  # never read: a NaN there would otherwise poison dW
    loss, dh, dw, db = sx.linear_cross_entropy_grad(h, w, t, linear_bias=b, chunk_size=2)
    assert np.isfinite(loss) and np.isfinite(dw).all() and np.isfinite(db).all()
    assert not dh[t == -100].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_lower_precision_inputs_keep_their_dtype(dtype):
    h, w, b, t, _ = _problem((40,), 16, 50, "index")
    loss, dh, dw, db = sx.linear_cross_entropy_grad(h.astype(dtype), w.astype(dtype), t, linear_bias=b.astype(dtype))
    assert loss.dtype == dtype and dh.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    rounded = [x.astype(dtype).astype(np.float64) for x in (h, w, b)]
    want = _reference(rounded[0], rounded[1], t, rounded[2])
    tol = 1e-5 if dtype == np.float32 else 3e-3
    for g, r in zip((loss, dh, dw, db), want, strict=True):
        np.testing.assert_allclose(g.astype(np.float64), r, rtol=tol, atol=tol * np.abs(r).max())


def test_central_differences_of_every_input():
    h, w, b, t, _ = _problem((6,), 3, 5, "index", ignored=0.0)
    options = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, chunk_size=4)
    _, dh, dw, db = sx.linear_cross_entropy_grad(h, w, t, linear_bias=b, **options)
    for x, g in ((h, dh), (w, dw), (b, db)):
        numeric = numerical_gradient(lambda _: sx.linear_cross_entropy(h, w, t, linear_bias=b, **options), x)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        (((4, 3), (5, 2), (4,)), {}, ValueError, "linear_weight .* must have D=3 columns"),
        (((4, 3), (5, 3, 1), (4,)), {}, ValueError, r"linear_weight must have shape \(V, D\)"),
        (((4, 3), (5, 3), (4,)), {"linear_bias": np.zeros(4)}, ValueError, r"linear_bias must have shape \(5,\)"),
        (((4, 3), (5, 3), (3,)), {}, ValueError, "target of class indices must have shape"),
        (((4, 3), (5, 3), (4,)), {"weight": np.ones(4)}, ValueError, r"weight must have shape \(5,\)"),
        (((4, 3), (5, 3), (4,)), {"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        (((4, 3), (5, 3), (4,)), {"chunk_size": True}, ValueError, "chunk_size must be a positive int"),
        (((4, 3), (5, 3), (4,)), {"label_smoothing": 2.0}, ValueError, "label_smoothing"),
        (((4, 3), (5, 3), (4, 4)), {}, ValueError, "class probabilities must have the logits' shape"),
        (((), (5, 3), (4,)), {}, ValueError, "hidden must have at least one dimension"),
        (((4, 3), (0, 3), (4,)), {}, ValueError, "at least one class"),
    ],
)
def test_bad_input_is_rejected_naming_the_argument(args, kwargs, error, message):
    h_shape, w_shape, t_shape = args
    h, w = np.ones(h_shape), np.ones(w_shape)
    t = np.ones(t_shape) / 5 if len(t_shape) == 2 else np.zeros(t_shape, int)
    with pytest.raises(error, match=message):
        sx.linear_cross_entropy_grad(h, w, t, **kwargs)


def test_out_of_range_target_and_integer_arrays_are_rejected_and_nothing_is_modified():
    h, w, b, t, _ = _problem((6,), 3, 5, "index", ignored=0.0)
    t[2] = 5
    copies = [x.copy() for x in (h, w, b, t)]
    with pytest.raises(ValueError, match="target contains class index 5, outside"):
        sx.linear_cross_entropy_grad(h, w, t, linear_bias=b)
    for x, c in zip((h, w, b, t), copies, strict=True):
        np.testing.assert_array_equal(x, c)
    with pytest.raises(TypeError, match="hidden must have dtype float16, float32 or float64"):
        sx.linear_cross_entropy(np.ones((2, 3), int), w, t[:2])
    with pytest.raises(TypeError, match="linear_weight must have dtype float16, float32 or float64"):
        sx.linear_cross_entropy(h, np.ones((5, 3), int), t)
    with pytest.raises(ValueError, match="grad_output must have the loss's shape"):
        sx.linear_cross_entropy_grad(h, w, np.zeros(6, int), grad_output=np.ones(3))
