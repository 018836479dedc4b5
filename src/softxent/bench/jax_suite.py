r"""``softxent bench --backend jax``: softxent.jax against optax under ``jax.jit``.

Suite ``lce``: forward+backward (``jax.value_and_grad`` w.r.t. hidden and W) of
``softxent.jax.linear_cross_entropy`` against the naive
``optax.softmax_cross_entropy_with_integer_labels(h @ W.T, y).mean()``.  Suite ``ce``:
forward+backward of ``softxent.jax.cross_entropy`` against optax's, on given logits, with a
same-size memory copy as the bandwidth yardstick.  All contenders are compiled first (the
compile time is not timed), then timed alternately in one process (median of ``reps``).

Memory is XLA's own account of the compiled step (``memory_analysis()``): the temporary
bytes above the inputs and the outputs (loss and gradients) — exact and repeatable,
unlike the resident set; it is reported in MiB and as a fraction of the float32 N×V logits.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import jax as sxj


def _timed(compiled, args, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def _contenders(suite: str, shape, dtype):
    key = jax.random.PRNGKey(0)
    if suite == "lce":
        n, d, v = shape
        h = (jax.random.normal(key, (n, d)) * 0.05).astype(dtype)
        w = (jax.random.normal(jax.random.PRNGKey(1), (v, d)) * 0.05).astype(dtype)
        y = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, v)

        def naive(h, w):
            import optax

            logits = (h @ w.T).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def fused(h, w):
            return sxj.linear_cross_entropy(h, w, y)

        steps = {
            "softxent.jax linear_cross_entropy": jax.value_and_grad(fused, argnums=(0, 1)),
            "optax naive (h @ W.T, then loss)": jax.value_and_grad(naive, argnums=(0, 1)),
        }
        return steps, (h, w), n * v * 4
    n, v = shape
    z = (jax.random.normal(key, (n, v)) * 2).astype(dtype)
    y = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, v)

    def optax_ce(z):
        import optax

        return optax.softmax_cross_entropy_with_integer_labels(z.astype(jnp.float32), y).mean()

    steps = {
        "softxent.jax cross_entropy": jax.value_and_grad(lambda z: sxj.cross_entropy(z, y)),
        "optax softmax_cross_entropy_with_integer_labels": jax.value_and_grad(optax_ce),
        "memory copy (z * 1, same size)": lambda z: z * jnp.asarray(1, z.dtype),
    }
    return steps, (z,), n * v * 4


def run(suite: str, shapes, dtype_name: str, reps: int) -> list[dict]:
    """Rows of {problem, contender, ms, ratio to the last non-copy peer, temp MiB, temp % of logits, loss}."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype_name]
    rows = []
    for shape in shapes:
        steps, args, logits_bytes = _contenders(suite, shape, dtype)
        compiled = {name: jax.jit(fn).lower(*args).compile() for name, fn in steps.items()}
        for c in compiled.values():
            jax.block_until_ready(c(*args))  # warm-up
        times = {name: [] for name in compiled}
        for _ in range(reps):  # alternate, so that the machine's drift hits every contender alike
            for name, c in compiled.items():
                times[name] += _timed(c, args, 1)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        peers = [name for name in compiled if name.startswith("optax")]
        label = "x".join(map(str, shape))
        for name, c in compiled.items():
            analysis = c.memory_analysis()
            temp = None if analysis is None else analysis.temp_size_in_bytes
            out = c(*args)
            loss = float(out[0]) if isinstance(out, tuple) else None
            rows.append(
                {
                    "problem": f"{suite} {label} {dtype_name}",
                    "contender": name,
                    "ms": medians[name] * 1e3,
                    "vs_optax": medians[name] / medians[peers[0]] if peers else None,
                    "temp_mib": None if temp is None else temp / 2**20,
                    "temp_of_logits": None if temp is None else temp / logits_bytes,
                    "loss": loss,
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| problem | contender | ms (median) | time / optax | XLA temp MiB | temp / fp32 logits | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["vs_optax"] is None else f"{r['vs_optax']:.2f}×"
        temp = "" if r["temp_mib"] is None else f"{r['temp_mib']:.0f}"
        share = "" if r["temp_of_logits"] is None else f"{r['temp_of_logits']:.1%}"
        loss = "" if r["loss"] is None else f"{r['loss']:.6f}"
        lines.append(f"| {r['problem']} | {r['contender']} | {r['ms']:.1f} | {ratio} | {temp} | {share} | {loss} |")
    return "\n".join(lines)


def machine() -> dict:
    """JAX's view of the machine."""
    device = jax.devices()[0]
    return {"jax": jax.__version__, "device": str(device), "platform": device.platform, "numpy": np.__version__}
