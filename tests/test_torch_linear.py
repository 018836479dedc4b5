"""softxent.torch.linear_cross_entropy against naive F.linear + F.cross_entropy autograd."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt
from softxent.torch import linear as linear_module
from torch_reference import reference_linear_loss

OPTIONS = [
    {},
    {"reduction": "sum", "label_smoothing": 0.1},
    {"reduction": "none"},
    {"z_loss": 1e-3, "softcap": 2.5},
    {"ignore_index": 3},  # a real class ignored
    {"weight": True, "label_smoothing": 0.2},
    {"weight": True, "reduction": "none", "z_loss": 1e-3},
]


def _problem(lead, d, v, kind, dtype=torch.float64, seed=0, ignored=0.2, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    if kind == "index":
        t = torch.randint(0, v, lead, generator=gen)
        t[torch.rand(lead, generator=gen) < ignored] = -100
    else:
        t = torch.softmax(torch.randn(*lead, v, generator=gen, dtype=torch.float64), -1)
    cw = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    leaves = [x.to(dtype).requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    return leaves, t if kind == "index" else t.to(dtype), cw.to(dtype)


def _grads(loss, leaves, upstream):
    grads = torch.autograd.grad(loss, leaves, upstream, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


def _compare(leaves, target, options, chunk_size=None, atol=1e-12, rtol=1e-10):
    ours_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_target = target.double() if target.is_floating_point() else target
    ours_opts = dict(options)
    ref_opts = dict(options)
    if ref_opts.get("weight") is not None:
        ref_opts["weight"] = ref_opts["weight"].double()
    h, w, *b = ours_leaves
    ours = sxt.linear_cross_entropy(h, w, target, linear_bias=b[0] if b else None, chunk_size=chunk_size, **ours_opts)
    rh, rw, *rb = ref_leaves
    ref = reference_linear_loss(rh, rw, ref_target, rb[0] if rb else None, **ref_opts)
    assert ours.dtype == h.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref, atol=atol, rtol=rtol)
    if ours.numel():
        upstream = torch.linspace(-1.0, 2.0, ours.numel(), dtype=torch.float64).reshape(ours.shape)
        for g, r in zip(
            _grads(ours, ours_leaves, upstream.to(ours.dtype)), _grads(ref, ref_leaves, upstream), strict=True
        ):
            torch.testing.assert_close(g.double(), r, atol=atol * max(1.0, r.abs().max().item()), rtol=rtol)


@pytest.mark.parametrize(
    "options,kind,lead,chunk",
    [
        (options, kind, lead, chunk)
        for options, kind, lead, chunk in itertools.product(OPTIONS, ["index", "probs"], [(23,), (2, 5)], [None, 4])
        if kind == "index" or "ignore_index" not in options  # ignore_index applies to class indices only
    ],
)
def test_matches_naive_float64_autograd(backend, options, kind, lead, chunk):
    leaves, target, cw = _problem(lead, 7, 19, kind, ignored=0.2 if "ignore_index" not in options else 0.0)
    opts = {k: (cw if k == "weight" else v) for k, v in options.items()}
    _compare(leaves, target, opts, chunk)


@pytest.mark.parametrize(
    "lead,d,v,chunk,bias",
    [
        ((1,), 5, 3, None, True),
        ((17,), 4, 1, None, True),
        ((17,), 4, 2, 3, False),
        ((64,), 3, 257, 10, True),
        ((), 6, 11, None, True),
        ((3, 4), 5, 9, 5, False),
    ],
)
def test_shapes(lead, d, v, chunk, bias):
    leaves, target, _ = _problem(lead, d, v, "index", ignored=0.0, bias=bias)
    _compare(leaves, target, {}, chunk)
    _compare(leaves, target, {"reduction": "none"}, chunk)


def test_float32_matches_pytorch_to_float32_rounding(backend):
    leaves, target, _ = _problem((300,), 64, 1000, "index", dtype=torch.float32)
    _compare(leaves, target, {"label_smoothing": 0.1}, 128, atol=1e-6, rtol=1e-5)


def test_equals_torch_linear_cross_entropy_on_its_options():
    leaves, target, cw = _problem((50,), 8, 30, "index")
    h, w, b = leaves
    for kwargs in ({}, {"weight": cw, "label_smoothing": 0.1, "reduction": "sum"}, {"reduction": "none"}):
        ours = sxt.linear_cross_entropy(h, w, target, linear_bias=b, **kwargs)
        theirs = F.linear_cross_entropy(h, w, target, linear_bias=b, ignore_index=-100, **kwargs)
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_probability_targets_get_their_gradient():
    leaves, q, cw = _problem((6,), 4, 5, "probs")
    q.requires_grad_()
    h, w, b = leaves
    ours = sxt.linear_cross_entropy(h, w, q, linear_bias=b, weight=cw, label_smoothing=0.1, softcap=3.0)
    q_ref = q.detach().clone().requires_grad_()
    ref = reference_linear_loss(h, w, q_ref, b, weight=cw, label_smoothing=0.1, softcap=3.0)
    (g,) = torch.autograd.grad(ours, [q])
    (r,) = torch.autograd.grad(ref, [q_ref])
    torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_all_ignored_and_empty_batches_give_zero_loss_and_gradients():
    (h, w, b), _, _ = _problem((5,), 4, 6, "index")
    loss = sxt.linear_cross_entropy(h, w, torch.full((5,), -100), linear_bias=b)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any() and not b.grad.any()
    empty = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    loss = sxt.linear_cross_entropy(empty, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 4)


def test_ignored_tokens_are_skipped_before_the_matmul():
    (h, w, b), t, _ = _problem((12,), 4, 6, "index", ignored=0.5)
    with torch.no_grad():
        h[t == -100] = float("nan")  # never read: otherwise NaN would reach dW
    loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
    assert not h.grad[t == -100].any()


def test_bfloat16_and_autocast_keep_float32_statistics():
    (h, w), t, _ = _problem((64,), 32, 200, "index", dtype=torch.float32, bias=False)
    ref_h, ref_w = (x.detach().to(torch.bfloat16).double().requires_grad_() for x in (h, w))
    ref = reference_linear_loss(ref_h, ref_w, t)
    ref.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sxt.linear_cross_entropy(h, w, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, atol=2e-2, rtol=1e-2)
    for g, r in ((h.grad, ref_h.grad), (w.grad, ref_w.grad)):
        torch.testing.assert_close(g.double(), r, atol=2e-2 * r.abs().max().item(), rtol=5e-2)
    hb, wb = (x.detach().to(torch.bfloat16).requires_grad_() for x in (h, w))
    loss16 = sxt.linear_cross_entropy(hb, wb, t, chunk_size=16)
    loss16.backward()
    assert loss16.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss16.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(wb.grad.double(), ref_w.grad, atol=2e-2 * ref_w.grad.abs().max().item(), rtol=5e-2)


def test_backward_only_scales_the_gradients_computed_in_forward(monkeypatch):
    (h, w, b), t, _ = _problem((10,), 4, 7, "index")
    calls = []
    original = linear_module._run
    monkeypatch.setattr(linear_module, "_run", lambda *a: calls.append(a[9]) or original(*a))  # wanted
    loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b)
    (3.0 * loss).backward()
    assert calls == [(True, True, True, False)]  # one chunk loop, gradients included
    ref_leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    (3.0 * reference_linear_loss(*ref_leaves[:2], t, ref_leaves[2])).backward()
    for x, r in zip((h, w, b), ref_leaves, strict=True):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-12, rtol=1e-10)


def test_module_holds_only_options():
    (h, w, b), t, cw = _problem((2, 6), 4, 7, "index")
    module = sxt.LinearCrossEntropyLoss(cw, label_smoothing=0.1, z_loss=1e-3, chunk_size=5)
    assert list(module.parameters()) == [] and "chunk_size=5" in repr(module)
    got = module(h, w, t, b)
    want = sxt.linear_cross_entropy(h, w, t, linear_bias=b, weight=cw, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="reduction"):
        sxt.LinearCrossEntropyLoss(reduction="avg")


def test_custom_op_passes_opcheck():
    (h, w, b), t, cw = _problem((6,), 4, 9, "index", dtype=torch.float32)
    q = torch.softmax(torch.randn(6, 9), 1)
    op = torch.ops.softxent.linear_cross_entropy.default
    for target, bias, weight, grad_output, reduction, smoothing, z_loss, cap, chunk, wanted in [
        (t, b, None, None, "mean", 0.0, 0.0, 0.0, 0, (True, True, True, False)),
        (t, None, cw, torch.randn(6), "none", 0.1, 1e-3, 5.0, 4, (True, True, False, False)),
        (q, b, cw, None, "sum", 0.2, 0.0, 0.0, 2, (True, False, True, True)),
        (t, b, None, None, "mean", 0.0, 0.0, 0.0, 0, (False, False, False, False)),
    ]:
        args = (h, w, bias, target, weight, grad_output, -100, True, reduction, smoothing, z_loss, cap, chunk)
        torch.library.opcheck(op, (*args, torch.float32, *wanted))


def test_torch_compile_fullgraph_traces_a_language_model_head():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Tanh())
    head = torch.nn.Linear(16, 50)
    tokens = torch.randint(0, 50, (3, 7))
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :2] = -100

    def step(x, y):
        return sxt.linear_cross_entropy(body(x), head.weight, y, linear_bias=head.bias, z_loss=1e-4, chunk_size=8)

    params = list(body.parameters()) + list(head.parameters())
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(tokens, labels)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = step(tokens, labels)
    grads_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for a, e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, e)


def test_torch_func_grad_uses_plain_ops():
    (h, w, b), t, _ = _problem((8,), 4, 6, "index")

    def loss_of(weight):
        return sxt.linear_cross_entropy(h.detach(), weight, t, linear_bias=b.detach(), label_smoothing=0.1)

    got = torch.func.grad(loss_of)(w.detach())
    ref_w = w.detach().clone().requires_grad_()
    reference_linear_loss(h.detach(), ref_w, t, b.detach(), label_smoothing=0.1).backward()
    torch.testing.assert_close(got, ref_w.grad)


@pytest.mark.parametrize("kind,options", [("index", {}), ("index", {"label_smoothing": 0.1, "reduction": "none"}),
                                          ("probability", {"reduction": "sum"})], ids=str)  # fmt: skip
def test_double_backward_matches_the_materialized_logits(kind, options):
    (h, w, b), t, cw = _problem((2, 5), 4, 6, kind)
    cw = cw.requires_grad_() if kind == "probability" else cw
    results, v = [], None
    for ours in (False, True):
        if ours:
            loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b, weight=cw, chunk_size=3, **options)
        else:
            loss = reference_linear_loss(h, w, t, b, weight=cw, **options)
        leaves = [h, w, b] + ([cw] if kind == "probability" else [])
        first = torch.autograd.grad(loss.sum(), leaves, create_graph=True)
        v = [torch.randn_like(g) for g in first] if v is None else v
        second = torch.autograd.grad(sum((g * u).sum() for g, u in zip(first, v, strict=True)), leaves)
        results.append((*first, *second))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs)


def test_class_weight_gradients_with_class_indices_raise_clearly():
    (h, w, b), t, cw = _problem((8,), 4, 6, "index")
    cw.requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        sxt.linear_cross_entropy(h, w, t, weight=cw)
    with torch.no_grad():
        sxt.linear_cross_entropy(h, w, t, weight=cw)  # no graph, no derivative to refuse


@pytest.mark.parametrize(
    "h_shape,w_shape,t_shape,kwargs,message",
    [
        ((4, 3), (5, 2), (4,), {}, "linear_weight .* must have D=3 columns, the last dimension of input"),
        ((4, 3), (5, 3), (4,), {"linear_bias": torch.zeros(4)}, r"linear_bias must have shape \(5,\)"),
        ((4, 3), (5, 3), (3,), {}, "target of class indices must have shape"),
        ((4, 3), (5, 3), (4,), {"weight": torch.ones(4)}, r"weight must have shape \(5,\)"),
        ((4, 3), (5, 3), (4,), {"chunk_size": 0}, "chunk_size must be a positive int"),
        ((4, 3), (5, 3), (4,), {"reduction": "avg"}, "reduction must be one of"),
        ((), (5, 3), (4,), {}, "input must have at least one dimension"),
        ((3,), (5, 2, 3), (), {}, r"K-dimensional linear_weight \(5, 2, 3\) needs batched input"),
        ((4, 3), (5, 2, 3), (4, 2), {"linear_bias": torch.zeros(5)}, r"linear_bias must have shape \(5, 2\)"),
    ],
)
def test_bad_input_is_rejected_naming_the_argument(h_shape, w_shape, t_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sxt.linear_cross_entropy(
            torch.ones(h_shape), torch.ones(w_shape), torch.zeros(t_shape, dtype=torch.long), **kwargs
        )


def test_out_of_range_target_raises_value_error_and_integer_inputs_type_error():
    (h, w, b), t, _ = _problem((6,), 3, 5, "index", ignored=0.0)
    t[1] = 7
    with pytest.raises(ValueError, match="target contains class index 7"):
        sxt.linear_cross_entropy(h, w, t)
    assert h.grad is None
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        sxt.linear_cross_entropy(torch.ones(2, 3, dtype=torch.long), w, t[:2])
    with pytest.raises(TypeError, match="linear_weight must be a floating-point tensor"):
        sxt.linear_cross_entropy(h, torch.ones(5, 3, dtype=torch.long), t)


def test_automatic_chunk_keeps_one_chunk_of_logits_small():
    from softxent._linear_chunks import auto_chunk_rows

    logits = 4096 * 32000 * 4
    rows = auto_chunk_rows(4096, 32000, 4)
    assert rows % 16 == 0 and 0.03 * logits <= rows * 32000 * 4 <= logits / 32  # 1/32 of the logits
    assert auto_chunk_rows(50, 32000, 4) == 50  # never more than N
    assert auto_chunk_rows(8192, 256000, 4) == 256  # capped at 256 MiB
    assert auto_chunk_rows(8192, 2**20, 4) == 64  # at least 64 rows for the GEMMs
    assert auto_chunk_rows(300, 1000, 4) == 300  # small problems: one chunk of 8 MiB or less
    assert auto_chunk_rows(0, 10, 4) == 1


def _pytorch_linear_samples(dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.linear_cross_entropy")
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pytorch_own_linear_cross_entropy_samples_give_pytorch_values_and_gradients(dtype, backend):
    samples = _pytorch_linear_samples(dtype)
    assert len(samples) >= 20
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for sample in samples:
        kwargs = {k: v for k, v in sample.kwargs.items() if k != "options"}  # PyTorch's chunking knobs
        args = (sample.input, *sample.args)
        ours_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        theirs_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
        ours_kw = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        bias = ours_kw.get("linear_bias")
        if bias is not None:
            ours_kw["linear_bias"] = bias.requires_grad_(kwargs["linear_bias"].requires_grad)
        ours = sxt.linear_cross_entropy(*ours_args, **ours_kw)
        theirs = F.linear_cross_entropy(*theirs_args, **kwargs)
        msg = f"{[tuple(a.shape) for a in args]} {kwargs}"
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, msg
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol, msg=msg)
        leaves = [(a, b) for a, b in zip(ours_args, theirs_args, strict=True) if a.requires_grad]
        if bias is not None and kwargs["linear_bias"].requires_grad:
            leaves.append((ours_kw["linear_bias"], kwargs["linear_bias"]))
        upstream = torch.linspace(-1.0, 2.0, max(ours.numel(), 1), dtype=ours.dtype).reshape(ours.shape)
        ours_grads = torch.autograd.grad(ours, [a for a, _ in leaves], upstream, allow_unused=True)
        theirs_grads = torch.autograd.grad(theirs, [b for _, b in leaves], upstream, allow_unused=True)
        for g, r in zip(ours_grads, theirs_grads, strict=True):
            if r is None:
                assert g is None or not g.any(), msg
                continue
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(g, r, atol=tol * scale, rtol=tol, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_gemm_in_column_blocks_matches_naive(monkeypatch, dtype):
    """The CPU logits GEMM runs in blocks of rows × vocabulary columns written into strided
    views of the chunk; blocks that do not divide V or the chunk give the same result."""
    from softxent.torch import backends

    monkeypatch.setattr(backends, "LOGITS_GEMM_COLS", 96)
    monkeypatch.setattr(backends, "LOGITS_GEMM_ROWS", 7)
    leaves, t, cw = _problem((3, 11), 17, 1000, "index", dtype=dtype)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    _compare(leaves, t, {"weight": cw, "label_smoothing": 0.1}, chunk_size=20, **tol)


def test_default_column_blocks_cover_a_vocabulary_wider_than_one_block():
    from softxent._linear_chunks import LOGITS_GEMM_COLS

    v = 2 * LOGITS_GEMM_COLS + 77
    leaves, t, _ = _problem((40,), 9, v, "index", dtype=torch.float64)
    _compare(leaves, t, {}, chunk_size=16)


def test_ignore_index_none_means_minus_100_as_pytorch_linear_cross_entropy():
    """PyTorch's F.linear_cross_entropy maps ignore_index=None (its default) to −100 for class
    indices; softxent's torch API is a drop-in, so None must not turn ignoring off there."""
    (h, w, b), t, _ = _problem((9,), 5, 7, "index", ignored=0.4)
    assert (t == -100).any()
    ours = sxt.linear_cross_entropy(h, w, t, linear_bias=b, ignore_index=None)
    torch.testing.assert_close(ours, F.linear_cross_entropy(h, w, t, linear_bias=b, ignore_index=None))
    torch.testing.assert_close(ours, sxt.linear_cross_entropy(h, w, t, linear_bias=b))
    torch.testing.assert_close(ours, sxt.LinearCrossEntropyLoss()(h, w, t, b))
    torch.testing.assert_close(ours, F.cross_entropy(F.linear(h, w, b), t))


def test_ignore_index_with_probability_targets_raises_as_pytorch():
    (h, w), q, _ = _problem((4,), 5, 7, "probs", bias=False)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified when target contains probabilities"):
        F.linear_cross_entropy(h, w, q, ignore_index=-100)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified when target contains probabilities"):
        sxt.linear_cross_entropy(h, w, q, ignore_index=-100)
    assert h.grad is None
    torch.testing.assert_close(sxt.linear_cross_entropy(h, w, q), F.linear_cross_entropy(h, w, q))


def test_bias_inside_the_logits_gemm_gives_the_same_result(monkeypatch):
    """CUDA adds the bias in the logits GEMM (addmm); the chunk loop with that operation, run here
    on CPU tensors, equals the separate bias pass."""
    from softxent.torch import linear_arrays

    real = linear_arrays.array_ops

    def with_bias_in_gemm(backend):
        import dataclasses

        return dataclasses.replace(real(backend), matmul_bias_into=linear_arrays.matmul_bias_into)

    monkeypatch.setattr(linear_module, "array_ops", with_bias_in_gemm)
    leaves, t, cw = _problem((5, 7), 9, 23, "index")
    _compare(leaves, t, {"weight": cw, "z_loss": 1e-3}, chunk_size=6)
    (h, w, b), t, _ = _problem((6,), 4, 5, "index", dtype=torch.float32)
    out = torch.empty(6, 5, dtype=torch.float64)  # another dtype than the operands
    linear_arrays.matmul_bias_into(h.detach(), w.detach().T, b.detach(), out)
    torch.testing.assert_close(out, (h @ w.T + b).detach().double())


def test_double_backward_with_a_bias_of_another_dtype_and_a_k_dimensional_weight():
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 6, (5,), generator=gen)
    for w_dtype, b_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        w = torch.randn(6, 4, generator=gen).to(w_dtype).requires_grad_()
        b = torch.randn(6, generator=gen).to(b_dtype).requires_grad_()
        loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b)
        first = torch.autograd.grad(loss, (h, w, b), create_graph=True)
        assert all(torch.isfinite(torch.autograd.grad(g.sum(), h, retain_graph=True)[0]).all() for g in first)
    # K-dimensional weight (V, d1, D): the logits are made inside the call and held for this
    w = torch.randn(6, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    tk = torch.randint(0, 6, (5, 3), generator=gen)
    results = []
    for ours in (False, True):
        if ours:
            loss = sxt.linear_cross_entropy(h, w, tk)
        else:
            loss = F.cross_entropy((h @ w.reshape(-1, 4).T).reshape(5, 6, 3), tk)
        (dh,) = torch.autograd.grad(loss, h, create_graph=True)
        results.append((dh, *torch.autograd.grad(dh.pow(2).sum(), (h, w))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ignored", [0, 500])
def test_float16_autocast_gradients_survive_a_loss_scale_applied_in_backward(ignored):
    # GradScaler under float16 autocast: (loss * S).backward().  The chunks' gradients (p − y)/N are
    # float16; stored unscaled, most entries of a large vocabulary would round to subnormals or 0
    torch.manual_seed(0)
    n, d, v, s = 512, 16, 8000, 2.0**12
    h0, w0, t = torch.randn(n, d), torch.randn(v, d) * 0.5, torch.randint(0, v, (n,))
    t[:ignored] = -100
    hr, wr = h0.double().requires_grad_(), w0.double().requires_grad_()
    F.cross_entropy(F.linear(hr, wr), t).backward()
    errors = []
    for loss_fn in (lambda h, w: F.cross_entropy(F.linear(h, w), t), lambda h, w: sxt.linear_cross_entropy(h, w, t)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(h, w)
        (loss * s).backward()
        errors.append([((a.grad.double() / s - b.grad).norm() / b.grad.norm()).item() for a, b in ((h, hr), (w, wr))])
    for ours, naive in zip(errors[1], errors[0], strict=True):
        assert ours <= 1.5 * naive, errors


def test_autocast_leaves_float64_layers_in_float64_as_pytorch():
    torch.manual_seed(0)
    h = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t, teacher = torch.randint(0, 11, (4,)), torch.randn(4, 11, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 tensors are not autocast-eligible
        naive = F.cross_entropy(F.linear(h, w), t)
        ours = sxt.linear_cross_entropy(h, w, t)
        distilled = sxt.linear_distill_loss(h, w, teacher)
    assert ours.dtype == distilled.dtype == torch.float64
    torch.testing.assert_close(ours, naive)
    torch.testing.assert_close(torch.autograd.grad(ours, w)[0], torch.autograd.grad(naive, w)[0])
    torch.testing.assert_close(distilled, sxt.linear_distill_loss(h, w, teacher))
