r"""Scalar building blocks that LLVM vectorizes: bit casts, max, exp, and half-precision loads.

Everything here is a Numba function meant to be inlined into a loop over a
contiguous row, where LLVM turns it into AVX2 / AVX-512 code:

* :func:`maxnum` — ``llvm.maxnum``: a max that ignores NaN.  Unlike ``a if a > b
  else b`` it vectorizes as a reduction; the NaN it ignores still reaches the
  result through the exponentials (``exp(NaN − m) = NaN``).
  :func:`running_max` is the same max for a running maximum that is never NaN,
  without the NaN blend (a NaN input may give NaN or be ignored).
* :func:`exp_le0` — e^d for d ≤ 0 (the only exponent softmax needs after
  subtracting the row max).  float32: Cody–Waite reduction d = k·ln2 + r,
  |r| ≤ ln2/2, a degree-6 polynomial for e^r and 2^k added into the exponent
  bits; max error 0.9 ulp against float64 ``np.exp`` (see the tests), 0 below
  −87.34, NaN for NaN.  float64 uses libm's ``exp``.
* :func:`load` / :func:`store` — the compute value (float32, or float64 for
  float64 arrays) of an element.  float16 arrays travel as ``uint16`` and
  bfloat16 arrays as ``int16`` (their bits), since Numba has neither type.

The magic-number rounding in :func:`exp_le0` relies on ``(t + M) − M`` not being
simplified away, so these helpers are compiled without ``reassoc``; the loops
that call them may use it.
"""

from __future__ import annotations

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .alias_window import padded_row

#: fast-math flags of the row loops: reassociation lets sums vectorize; no
#: 'nnan'/'ninf', because NaN and ±inf must propagate exactly as in PyTorch.
LOOP_FLAGS = {"reassoc", "contract", "arcp", "nsz"}
#: flags of the scalar helpers (no 'reassoc': see the module docstring).
HELPER_FLAGS = {"contract", "arcp", "nsz"}

# error_model="numpy": float division without a ZeroDivisionError branch, which
# would stop LLVM from vectorizing the loop around it.
#: njit options of the row loops
LOOP_JIT = dict(fastmath=LOOP_FLAGS, error_model="numpy", cache=True)
#: njit options of the scalar helpers
HELPER_JIT = dict(fastmath=HELPER_FLAGS, error_model="numpy", cache=True)
#: njit options of loops that need exact IEEE semantics (no fast-math at all)
EXACT_JIT = dict(error_model="numpy", cache=True)

f32 = np.float32


@intrinsic
def _f32_bits(typingctx, x):
    """The int32 whose bits are those of the float32 x."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx, x):
    """The float32 whose bits are the low 32 bits of the integer x.

    Numba widens int32 arithmetic to int64; truncating here lets LLVM narrow
    the whole expression back to 32-bit vector lanes.
    """
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if x.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _half_bits_to_f32(typingctx, x):
    """float16 (given as its uint16 bits) → float32, exactly (``fpext half``)."""
    if x != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_half_bits(typingctx, x):
    """float32 → float16 bits (round to nearest even, ``fptrunc``)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(types.float32), codegen


def _maxnum_call(a, b, flags):
    """Typing and code of ``llvm.maxnum`` on two float32 or two float64 values, with the
    fast-math ``flags`` on the call."""
    if a != b or a not in (types.float32, types.float64):
        return None
    llty = ir.FloatType() if a == types.float32 else ir.DoubleType()
    name = "llvm.maxnum.f32" if a == types.float32 else "llvm.maxnum.f64"

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(llty, [llty, llty]), name)
        return builder.call(fn, args, fastmath=flags)

    return a(a, a), codegen


@intrinsic
def maxnum(typingctx, a, b):
    """max(a, b) ignoring NaN (``llvm.maxnum``); vectorizes as a reduction."""
    return _maxnum_call(a, b, ())


@intrinsic
def running_max(typingctx, m, x):
    """max(m, x) for a running maximum ``m`` that is never NaN: ``llvm.maxnum`` with the
    ``nnan`` flag.  On AVX2 that is a bare ``vmaxps``, without the NaN blend:
    2.4× faster at 256 bits (0.20 → 0.08 ns an element, one thread, data in L1).

    A NaN ``x`` may give ``m`` or NaN.  Both are fine for the row kernels: a row with a
    NaN has a NaN sum of exponentials, and with it a NaN loss, gradient and lse, whatever
    the max; its argmax is found by a separate scan for the first NaN."""
    return _maxnum_call(m, x, ("nnan",))


@intrinsic
def _prefetch(typingctx, arr, index, for_write):
    """``llvm.prefetch`` of the cache line holding ``arr[index]`` (``for_write`` a literal bool)."""
    if not isinstance(arr, types.Array) or not isinstance(for_write, types.BooleanLiteral):
        return None
    rw = 1 if for_write.literal_value else 0

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        address = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        # locality 3 (keep in every cache level), data cache
        builder.call(fn, [address, ir.Constant(i32, rw), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index, for_write), codegen


#: bytes per cache line (every x86-64 CPU)
CACHE_LINE = 64


@njit(**EXACT_JIT)
def prefetch_range(arr, lo, hi, for_write):
    """Ask the CPU to bring ``arr[lo:hi]`` into cache (for writing if ``for_write``): issued
    ahead of the exponentials (:func:`~softxent.cpu.chunks.prefetch_distance`), it overlaps the
    next chunks' memory reads with this chunk's ``exp`` work."""
    step = max(1, CACHE_LINE // arr.itemsize)
    for j in range(lo, hi, step):
        if for_write:
            _prefetch(arr, j, True)
        else:
            _prefetch(arr, j, False)


@intrinsic
def _stream_scaled_line(typingctx, src, i, dst, j, factor, minus):
    """dst[j : j + L] = factor·src[i : i + L] − minus for one cache line (L·itemsize = 64 bytes),
    stored non-temporally (``!nontemporal``: ``vmovntps``/``vmovntpd``), which writes the line to
    memory without reading it first.  ``dst[j]`` must be 64-byte aligned, ``src[i]`` need not be;
    ``factor`` and ``minus`` have the arrays' element type.  The product and the difference carry
    'contract', as in the row loops, so LLVM forms the same fused multiply-add."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)):
        return None
    element_type = dst.dtype
    if element_type not in (types.float32, types.float64) or src.dtype != element_type:
        return None
    if factor != element_type or minus != element_type:
        return None
    lanes = CACHE_LINE * 8 // element_type.bitwidth

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        element = context.get_value_type(element_type)
        vector = ir.VectorType(element, lanes)
        source = context.make_array(signature.args[0])(context, builder, args[0]).data
        target = context.make_array(signature.args[2])(context, builder, args[2]).data
        value = builder.load(
            builder.bitcast(builder.gep(source, [args[1]]), vector.as_pointer()), align=element_type.bitwidth // 8
        )

        def splat(x):
            undefined = ir.Constant(vector, ir.Undefined)
            one = builder.insert_element(undefined, x, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, undefined, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))

        product = builder.fmul(value, splat(args[4]), flags=("contract",))
        result = builder.fsub(product, splat(args[5]), flags=("contract",))
        line = builder.bitcast(builder.gep(target, [args[3]]), vector.as_pointer())
        stored = builder.store(result, line, align=CACHE_LINE)
        stored.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(i32, 1)]))
        return context.get_dummy_value()

    return types.none(src, i, dst, j, factor, minus), codegen


#: an x86 CPU: non-temporal stores are ordered by ``sfence`` (elsewhere by a full fence)
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def store_fence(typingctx):
    """``sfence`` (a full fence off x86): the non-temporal stores issued before it are visible
    before any store after it."""

    def codegen(context, builder, signature, args):
        if X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@njit(**LOOP_JIT)
def scaled_store(src, dst, factor, minus):
    """dst_j = factor·src_j − minus, rounded to the element type of ``dst`` (``src`` in its
    compute type; ordinary stores)."""
    f = as_compute(src, factor)
    u = as_compute(src, minus)
    for j in range(src.size):
        store(dst, j, f * src[j] - u)


@njit(**EXACT_JIT)
def _stream_scaled_lines(src, dst, factor, minus):
    lanes = CACHE_LINE // dst.itemsize
    address = dst.ctypes.data
    head = ((CACHE_LINE - address % CACHE_LINE) % CACHE_LINE) // dst.itemsize
    head = dst.size if address % dst.itemsize else min(dst.size, head)  # misaligned elements: no lines
    scaled_store(src[:head], dst[:head], factor, minus)
    j = head
    while j + lanes <= dst.size:
        _stream_scaled_line(src, j, dst, j, factor, minus)
        j += lanes
    scaled_store(src[j:], dst[j:], factor, minus)


def stream_scaled(src, dst, factor, minus):
    """dst_j = factor·src_j − minus (Numba only; ``src`` in the compute type of ``dst``, of the
    same size).  For float32/float64 ``dst`` the whole cache lines are stored non-temporally and
    the unaligned ends ordinarily: a large output that nothing reads back soon is written
    without the read of each line that an ordinary store begins with (a third of the memory
    traffic of a copy).  Call :func:`store_fence` before anything that must see the stores —
    another thread, or an ordinary store to the same memory.  16-bit ``dst``: ordinary
    rounding stores."""
    raise NotImplementedError("stream_scaled is only callable from Numba code")


def finish_row(work, grad_row, stream):
    """The row a kernel's final pass writes: ``work`` (the compute-type row of exponentials)
    when the gradient is streamed out of it afterwards (:func:`stream_scaled`), else the
    gradient row itself (Numba only; a 16-bit gradient row is always written directly)."""
    raise NotImplementedError("finish_row is only callable from Numba code")


def _float32_or_libm(stub, float32_impl, libm, **options) -> None:
    """Give the Numba-only function ``stub`` its implementations: ``float32_impl`` (a Numba
    function) for float32 arguments, ``libm`` (a ``math`` function) for float64 ones."""

    @overload(stub, jit_options={"fastmath": HELPER_FLAGS, "error_model": "numpy"}, **options)
    def _implementation(x):
        if x == types.float32:
            return lambda x: float32_impl(x)
        if x == types.float64:
            return lambda x: libm(x)
        return None


# --- exp -------------------------------------------------------------------

_LOG2E = f32(1.4426950408889634)
_MAGIC = f32(12582912.0)  # 1.5·2^23: adding it rounds to an integer kept in the low mantissa bits
_LN2_HI = f32(0.693359375)  # ln 2 split so that k·_LN2_HI is exact for |k| ≤ 2^9
_LN2_LO = f32(-2.12194440e-4)
_UNDERFLOW = f32(-87.33654)  # below this e^d is under 2^-126
# minimax for e^r on [−ln2/2, ln2/2] with the first two coefficients fixed to 1 (rel. error 3e-9)
_Q2 = f32(0.4999999403953552)
_Q3 = f32(0.1666652113199234)
_Q4 = f32(0.04166838526725769)
_Q5 = f32(0.008368710055947304)
_Q6 = f32(0.001381467911414802)


@njit(**HELPER_JIT)
def _exp_le0_f32(d):
    # no clamp of d: below _UNDERFLOW the bits computed are garbage, and the select at the
    # end returns 0 there (NaN keeps its NaN: `d < x` is False for it)
    t = d * _LOG2E + _MAGIC
    k = t - _MAGIC
    r = d - k * _LN2_HI
    r = r - k * _LN2_LO
    p = _Q6 * r + _Q5
    p = p * r + _Q4
    p = p * r + _Q3
    p = p * r + _Q2
    p = p * r + f32(1.0)
    p = p * r + f32(1.0)
    v = _f32_from_bits(_f32_bits(p) + (_f32_bits(t) << np.int32(23)))
    return f32(0.0) if d < _UNDERFLOW else v


def exp_le0(d):
    """e^d for d ≤ 0 (Numba only)."""
    raise NotImplementedError("exp_le0 is only callable from Numba code")


_float32_or_libm(exp_le0, _exp_le0_f32, math.exp)


# --- log ---------------------------------------------------------------------

_SQRT_HALF = f32(0.70710678118654752)
# Cephes logf: log(1 + r) = r − r²/2 + r³·P(r) on [√½ − 1, √2 − 1] (about 1 ulp)
_L1 = f32(7.0376836292e-2)
_L2 = f32(-1.1514610310e-1)
_L3 = f32(1.1676998740e-1)
_L4 = f32(-1.2420140846e-1)
_L5 = f32(1.4249322787e-1)
_L6 = f32(-1.6668057665e-1)
_L7 = f32(2.0000714765e-1)
_L8 = f32(-2.4999993993e-1)
_L9 = f32(3.3333331174e-1)


@njit(inline="always", **HELPER_JIT)
def _log_reduced_f32(r, kf):
    """log(1 + r) + kf·ln 2 for r in [√½ − 1, √2 − 1] (float32, about 1 ulp)."""
    z = r * r
    p = _L1 * r + _L2
    p = p * r + _L3
    p = p * r + _L4
    p = p * r + _L5
    p = p * r + _L6
    p = p * r + _L7
    p = p * r + _L8
    p = p * r + _L9
    y = p * r * z + kf * _LN2_LO - f32(0.5) * z
    return r + y + kf * _LN2_HI


@njit(**HELPER_JIT)
def _log_f32(x):
    bits = _f32_bits(x)
    k = ((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(126)
    f = _f32_from_bits((bits & np.int32(0x7FFFFF)) | np.int32(0x3F000000))  # x = f·2^k, f in [0.5, 1)
    small = f < _SQRT_HALF
    k = k - np.int32(1) if small else k
    r = (f + f - f32(1.0)) if small else (f - f32(1.0))
    v = _log_reduced_f32(r, f32(k))
    return v if x == x else x  # NaN stays NaN


_SQRT_TWO = f32(1.4142135623730951)


@njit(**HELPER_JIT)
def _log_1_to_2_f32(s):
    # s = f·2^k with k ∈ {0, 1} and f in [√½, √2]: r = f − 1 is exact (Sterbenz); NaN stays NaN
    two = s > _SQRT_TWO
    f = s * f32(0.5) if two else s
    return _log_reduced_f32(f - f32(1.0), f32(1.0) if two else f32(0.0))


def log_pos(x):
    """log x for positive normal x (Numba only): a vectorizable float32 version
    (Cephes' logf, about 1 ulp), libm's for float64.  NaN gives NaN."""
    raise NotImplementedError("log_pos is only callable from Numba code")


_float32_or_libm(log_pos, _log_f32, math.log)


def log_1_to_2(s):
    """log s for 1 ≤ s ≤ 2 (Numba only): the normalizer of two classes relative to their max,
    s = 1 + e^{−|x_0 − x_1|}.  float32: the polynomial of :func:`log_pos` without its exponent
    extraction (the exponent is 0 or 1), 0.8 ulp — 1.4× faster over a two-class loop at 256
    bits; libm's for float64.  NaN gives NaN."""
    raise NotImplementedError("log_1_to_2 is only callable from Numba code")


_float32_or_libm(log_1_to_2, _log_1_to_2_f32, math.log)


# --- tanh (softcap) ---------------------------------------------------------

_TANH_SMALL = f32(0.625)
# tanh(x) = x·(1 + x²·P(x²)) on |x| < 0.625, minimax (relative error 4e-9)
_T1 = f32(-0.3333328068256378)
_T2 = f32(0.13331443071365356)
_T3 = f32(-0.05373973026871681)
_T4 = f32(0.020639121532440186)
_T5 = f32(-0.005705011542886496)


@njit(inline="always", **HELPER_JIT)
def _tanh_f32(x):
    ax = abs(x)
    u = x * x
    p = _T5 * u + _T4
    p = p * u + _T3
    p = p * u + _T2
    p = p * u + _T1
    small = x + x * u * p
    e = _exp_le0_f32(f32(-2.0) * ax)  # tanh|x| = (1 − e^{−2|x|}) / (1 + e^{−2|x|}), no cancellation here
    large = (f32(1.0) - e) / (f32(1.0) + e)
    large = -large if x < f32(0.0) else large
    return small if ax < _TANH_SMALL else large


def tanh(x):
    """tanh(x) (Numba only): vectorizable float32 version, libm for float64."""
    raise NotImplementedError("tanh is only callable from Numba code")


_float32_or_libm(tanh, _tanh_f32, math.tanh, inline="always")


# --- loads and stores across dtypes -----------------------------------------


@njit(**LOOP_JIT)
def float_sum(values):
    """Σ_j values_j in float64, in whatever order vectorizes (several partial sums: 'reassoc'),
    for sums of per-position losses kept apart from the loops that form them (a sum inside such a
    loop is one dependent add per position and keeps the loop scalar)."""
    total = 0.0
    for j in range(values.size):
        total += values[j]
    return total


def numba_view(a: np.ndarray) -> np.ndarray:
    """The array Numba receives: float16 travels as its uint16 bits (Numba has no float16)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def kernel_probabilities(q: np.ndarray, z_dtype) -> np.ndarray:
    """Probability targets as the kernels take them: C-contiguous, of the logits' dtype, or
    (another float dtype) of the compute dtype — float64 for float64 logits, else float32.
    Every kernel is compiled once per pair of logits and target dtypes (~13 s of JIT each):
    this keeps the pairs to a few.  Only a float64 target of 16-bit or float32 logits loses
    bits: rounded to float32 (relative 6e-8 a probability), less than the float32 rounding of
    the log-probabilities such a loss carries anyway (PyTorch's too)."""
    if q.dtype != z_dtype and q.dtype in (np.float16, np.float32, np.float64):
        q = q.astype(np.float64 if z_dtype == np.float64 else np.float32)
    return np.ascontiguousarray(q)


def load(x):
    """The compute value of one array element (Numba only)."""
    raise NotImplementedError("load is only callable from Numba code")


@overload(load)
def _load_overload(x):
    if x in (types.float32, types.float64):
        return lambda x: x
    if x == types.uint16:  # float16 bits
        return lambda x: _half_bits_to_f32(x)
    if x == types.int16:  # bfloat16 bits: the high half of a float32
        return lambda x: _f32_from_bits(np.int32(x) << np.int32(16))
    return None


def store(arr, j, v):
    """arr[j] = v, rounding v to the array's element type (Numba only)."""
    raise NotImplementedError("store is only callable from Numba code")


@overload(store)
def _store_overload(arr, j, v):
    dtype = arr.dtype
    if dtype in (types.float32, types.float64):

        def impl(arr, j, v):
            arr[j] = v

        return impl
    if dtype == types.uint16:

        def impl(arr, j, v):
            arr[j] = _f32_to_half_bits(f32(v))

        return impl
    if dtype == types.int16:

        def impl(arr, j, v):
            bits = _f32_bits(f32(v))
            # round to nearest even on the 16 dropped bits; NaN stays a quiet NaN
            rounded = (bits + np.int32(0x7FFF) + ((bits >> np.int32(16)) & np.int32(1))) >> np.int32(16)
            arr[j] = np.int16(np.int32(0x7FC0) if v != v else rounded)

        return impl
    return None


def compute_zero(arr):
    """0 in the compute type of ``arr`` (float32, or float64 for float64 arrays)."""
    raise NotImplementedError("compute_zero is only callable from Numba code")


@overload(compute_zero)
def _compute_zero_overload(arr):
    if arr.dtype == types.float64:
        return lambda arr: np.float64(0.0)
    return lambda arr: np.float32(0.0)


def compute_neg_inf(arr):
    """−inf in the compute type of ``arr``."""
    raise NotImplementedError("compute_neg_inf is only callable from Numba code")


@overload(compute_neg_inf)
def _compute_neg_inf_overload(arr):
    if arr.dtype == types.float64:
        return lambda arr: np.float64(-np.inf)
    return lambda arr: np.float32(-np.inf)


def as_compute(arr, x):
    """x converted to the compute type of ``arr``."""
    raise NotImplementedError("as_compute is only callable from Numba code")


@overload(as_compute)
def _as_compute_overload(arr, x):
    if arr.dtype == types.float64:
        return lambda arr, x: np.float64(x)
    return lambda arr, x: np.float32(x)


def work_row(grad_row, n):
    """The row that holds the exponentials before the final pass: the gradient row
    itself for float32/float64, a float32 scratch row for 16-bit gradients (with free margins:
    :func:`~softxent.cpu.alias_window.padded_row`)."""
    raise NotImplementedError("work_row is only callable from Numba code")


@overload(work_row)
def _work_row_overload(grad_row, n):
    if grad_row.dtype in (types.float32, types.float64):
        return lambda grad_row, n: grad_row
    return lambda grad_row, n: padded_row(grad_row, n)


def scratch_row(src_row, n):
    """An uninitialized row of ``n`` elements in the compute type of ``src_row``."""
    raise NotImplementedError("scratch_row is only callable from Numba code")


@overload(scratch_row)
def _scratch_row_overload(src_row, n):
    if src_row.dtype == types.float64:
        return lambda src_row, n: np.empty(n, np.float64)
    return lambda src_row, n: np.empty(n, np.float32)


@overload(stream_scaled, jit_options={"fastmath": LOOP_FLAGS, "error_model": "numpy"})
def _stream_scaled_overload(src, dst, factor, minus):
    if dst.dtype in (types.float32, types.float64) and src.dtype == dst.dtype:

        def impl(src, dst, factor, minus):
            _stream_scaled_lines(src, dst, as_compute(dst, factor), as_compute(dst, minus))

        return impl

    def impl(src, dst, factor, minus):
        scaled_store(src, dst, factor, minus)

    return impl


@overload(finish_row)
def _finish_row_overload(work, grad_row, stream):
    if grad_row.dtype == work.dtype:
        return lambda work, grad_row, stream: work if stream else grad_row
    return lambda work, grad_row, stream: grad_row
