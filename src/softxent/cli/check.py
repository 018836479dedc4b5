"""``softxent check``: float64 finite-difference checks of every function and option
(softmax family, cross-entropy, linear + cross-entropy, distillation and linear distillation).

Each case compares an analytic derivative that softxent returns (or that its
docstring states in closed form, for softmax / log_softmax / logsumexp) with
central differences of the function itself, on random inputs.  The command
prints one table row per case and exits with status 1 if any case fails.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import softxent as sx
from softxent._gradcheck import gradient_errors, numerical_gradient

from .arguments import seed

#: a case passes when max |analytic − numeric| ≤ ABS_TOL + REL_TOL·|numeric|
ABS_TOL = 1e-7
REL_TOL = 1e-6


@dataclass(frozen=True)
class CheckResult:
    name: str
    max_abs_error: float
    max_rel_error: float
    passed: bool


def _compare(name: str, analytic: np.ndarray, numeric: np.ndarray) -> CheckResult:
    abs_err, rel_err = gradient_errors(analytic, numeric)
    ok = bool(np.all(np.abs(analytic - numeric) <= ABS_TOL + REL_TOL * np.abs(numeric)))
    return CheckResult(name, abs_err, rel_err, ok)


def _vjp_cases(rng: np.random.Generator) -> list[tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]]]]:
    """softmax, log_softmax and logsumexp: their stated derivatives against differences."""
    z = rng.normal(scale=2.0, size=(4, 6))
    v = rng.normal(size=z.shape)

    def logsumexp():
        return sx.softmax(z), numerical_gradient(lambda x: float(sx.logsumexp(x).sum()), z.copy())

    def softmax():
        p = sx.softmax(z)  # J^T v = p ⊙ (v − ⟨v, p⟩)
        analytic = p * (v - (v * p).sum(axis=-1, keepdims=True))
        return analytic, numerical_gradient(lambda x: float((sx.softmax(x) * v).sum()), z.copy())

    def log_softmax():
        p = sx.softmax(z)  # J^T v = v − p·Σv
        analytic = v - p * v.sum(axis=-1, keepdims=True)
        return analytic, numerical_gradient(lambda x: float((sx.log_softmax(x) * v).sum()), z.copy())

    def softmax_axis0():
        zt = z.T.copy()
        p = sx.softmax(zt, axis=0)
        vt = v.T
        analytic = p * (vt - (vt * p).sum(axis=0, keepdims=True))
        return analytic, numerical_gradient(lambda x: float((sx.softmax(x, axis=0) * vt).sum()), zt.copy())

    return [
        ("logsumexp: d lse/dz = softmax", logsumexp),
        ("softmax: vjp p*(v - <v,p>)", softmax),
        ("log_softmax: vjp v - p*sum(v)", log_softmax),
        ("softmax axis=0", softmax_axis0),
    ]


def _cross_entropy_cases(rng: np.random.Generator):
    n, c = 6, 7
    z = rng.normal(scale=2.0, size=(n, c))
    t = rng.integers(0, c, size=n)
    t_ignored = t.copy()
    t_ignored[::3] = -100
    q = rng.dirichlet(np.ones(c), size=n)
    w = rng.uniform(0.3, 2.0, size=c)
    z4 = rng.normal(size=(2, c, 3, 2))
    t4 = rng.integers(0, c, size=(2, 3, 2))
    g_none = rng.normal(size=n)
    everything = dict(weight=w, label_smoothing=0.15, z_loss=1e-2, softcap=3.0)
    cases = [
        ("index, mean", z, t, {}),
        ("index, sum", z, t, dict(reduction="sum")),
        ("index, none + grad_output", z, t, dict(reduction="none", grad_output=g_none)),
        ("index, weight", z, t, dict(weight=w)),
        ("index, ignore_index", z, t_ignored, {}),
        ("index, ignore_index=None", z, t, dict(ignore_index=None)),
        ("index, label_smoothing", z, t, dict(label_smoothing=0.2)),
        ("index, z_loss", z, t, dict(z_loss=1e-2)),
        ("index, softcap", z, t, dict(softcap=2.5)),
        ("index, weight+ignore+smoothing", z, t_ignored, dict(weight=w, label_smoothing=0.1)),
        ("index, every option", z, t_ignored, everything),
        ("index, 4-D axis=1", z4, t4, dict(axis=1, label_smoothing=0.1)),
        ("prob, mean", z, q, {}),
        ("prob, weight+smoothing", z, q, dict(weight=w, label_smoothing=0.1)),
        ("prob, every option, sum", z, q, dict(everything, reduction="sum")),
    ]
    out = []
    for name, logits, target, options in cases:

        def run(logits=logits, target=target, options=options):
            g = options.get("grad_output")
            _, analytic = sx.cross_entropy_grad(logits, target, **options)
            plain = {k: v for k, v in options.items() if k != "grad_output"}

            def f(x):
                loss = sx.cross_entropy(x, target, **plain)
                return float((loss * g).sum()) if g is not None else float(loss)

            return analytic, numerical_gradient(f, logits.copy())

        out.append(("cross_entropy " + name, run))
    return out


def _linear_cross_entropy_cases(rng: np.random.Generator):
    """linear_cross_entropy_grad's dhidden, dlinear_weight, dlinear_bias against differences,
    chunked so that the chunk loop (several chunks, a partial last one) is what is checked."""
    n, d, v = 7, 4, 9
    h = rng.normal(size=(n, d))
    w = rng.normal(size=(v, d)) / 2.0
    b = rng.normal(size=v)
    t = rng.integers(0, v, size=n)
    t[1] = -100
    q = rng.dirichlet(np.ones(v), size=n)
    g_none = rng.normal(size=n)
    every = dict(weight=rng.uniform(0.3, 2.0, size=v), label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    cases = [
        ("index, ignore_index", t, {}),
        ("index, every option", t, every),
        ("index, none + grad_output", t, dict(reduction="none", grad_output=g_none)),
        ("prob, every option, sum", q, dict(every, reduction="sum")),
    ]
    out = []
    for name, target, options in cases:
        for which, wrt in (("dhidden", 0), ("dlinear_weight", 1), ("dlinear_bias", 2)):

            def run(target=target, options=options, wrt=wrt):
                g = options.get("grad_output")
                grads = sx.linear_cross_entropy_grad(h, w, target, linear_bias=b, chunk_size=3, **options)
                plain = {k: val for k, val in options.items() if k != "grad_output"}
                params = [h, w, b]

                def f(x):
                    args = [x if i == wrt else p for i, p in enumerate(params)]
                    loss = sx.linear_cross_entropy(args[0], args[1], target, linear_bias=args[2], **plain)
                    return float((loss * g).sum()) if g is not None else float(loss)

                return grads[1 + wrt], numerical_gradient(f, params[wrt].copy())

            out.append((f"linear_cross_entropy {name}: {which}", run))
    return out


def _with_upstream(loss, g) -> float:
    return float((loss * g).sum()) if g is not None else float(loss)


def _distill_cases(rng: np.random.Generator):
    """distill_loss_grad's dstudent (dense and top-k teachers, every divergence and option) and
    linear_distill_loss_grad's dstudent_hidden, dstudent_weight, dstudent_bias (a fused teacher,
    chunked) against differences."""
    n, v, d, k = 6, 8, 3, 3
    z = rng.normal(scale=1.5, size=(n, v))
    zt = rng.normal(scale=1.5, size=(n, v))
    t = rng.integers(0, v, size=n)
    t[2] = -100
    top = np.argsort(-zt, axis=-1)[:, :k]
    logprobs = np.take_along_axis(sx.log_softmax(zt), top, axis=-1)
    g_none = rng.normal(size=n)
    cases = [
        ("kl", zt, None, {}),
        ("reverse_kl, T=2", zt, None, dict(divergence="reverse_kl", temperature=2.0)),
        ("jsd beta=0.3, alpha, ignore_index", zt, t, dict(divergence="jsd", beta=0.3, alpha=0.2)),
        ("kl, T=1.5, alpha, no T^2, none + grad_output", zt, t,
         dict(temperature=1.5, alpha=0.3, temperature_scaling=False, reduction="none", grad_output=g_none)),
        ("top-k renormalize, jsd", sx.TopK(top, logprobs), t, dict(divergence="jsd", alpha=0.1)),
        ("top-k ignore, reverse_kl, sum", sx.TopK(top, logprobs), None,
         dict(divergence="reverse_kl", topk_rest="ignore", reduction="sum")),
    ]  # fmt: skip
    out = []
    for name, teacher, target, options in cases:

        def run(teacher=teacher, target=target, options=options):
            g = options.get("grad_output")
            _, analytic = sx.distill_loss_grad(z, teacher, target, **options)
            plain = {key: val for key, val in options.items() if key != "grad_output"}
            f = lambda x: _with_upstream(sx.distill_loss(x, teacher, target, **plain), g)  # noqa: E731
            return analytic, numerical_gradient(f, z.copy())

        out.append(("distill_loss " + name, run))
    h, w, b = rng.normal(size=(n, d)), rng.normal(size=(v, d)), rng.normal(size=v)
    fused = sx.FusedTeacher(rng.normal(size=(n, 2)), rng.normal(size=(v, 2)), rng.normal(size=v))
    options = dict(divergence="jsd", temperature=2.0, alpha=0.2)
    for which, wrt in (("dstudent_hidden", 0), ("dstudent_weight", 1), ("dstudent_bias", 2)):

        def run_linear(wrt=wrt):
            grads = sx.linear_distill_loss_grad(h, w, fused, t, student_bias=b, chunk_size=4, **options)
            params = [h, w, b]

            def f(x):
                args = [x if i == wrt else p for i, p in enumerate(params)]
                return float(sx.linear_distill_loss(args[0], args[1], fused, t, student_bias=args[2], **options))

            return grads[1 + wrt], numerical_gradient(f, params[wrt].copy())

        out.append((f"linear_distill_loss fused teacher, jsd, T=2, alpha: {which}", run_linear))
    return out


def run_checks(seed: int = 0) -> list[CheckResult]:
    """Run every case on random float64 inputs drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    results = []
    cases = _vjp_cases(rng) + _cross_entropy_cases(rng) + _linear_cross_entropy_cases(rng) + _distill_cases(rng)
    for name, case in cases:
        analytic, numeric = case()
        results.append(_compare(name, analytic, numeric))
    return results


def format_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  {'max abs err':>12}  {'max rel err':>12}  result"]
    lines.append("-" * len(lines[0]))
    for r in results:
        verdict = "pass" if r.passed else "FAIL"
        lines.append(f"{r.name:<{width}}  {r.max_abs_error:12.2e}  {r.max_rel_error:12.2e}  {verdict}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random inputs (default 0)")


def main(args: argparse.Namespace) -> int:
    results = run_checks(args.seed)
    print(format_table(results))
    failed = [r.name for r in results if not r.passed]
    tol = f"|analytic - numeric| <= {ABS_TOL:g} + {REL_TOL:g}*|numeric|"
    if failed:
        print(f"\n{len(failed)} of {len(results)} checks FAILED ({tol}): {', '.join(failed)}")
        return 1
    print(f"\nall {len(results)} checks passed ({tol}, float64 central differences)")
    return 0
