r"""The options of a distillation loss, validated once.

Every frontend (NumPy, PyTorch, JAX) builds a :class:`DistillOptions` with
:func:`make_distill_options` and every backend trusts it.  ``ignore_index`` and
``reduction`` are checked by :func:`softxent._options.make_options`, exactly as for
cross-entropy.  The PyTorch ops take the options as flat scalars:
:func:`flat_options` makes that form and :func:`options_from_flat` reads it back.

Per token, with p_s = softmax(z_s/T) and p_t = softmax(z_t/T) (see
:mod:`softxent._distill_reference`), the loss is

.. math:: \ell = (1-α)\,T^2\,D(p_t, p_s) + α\,\mathrm{CE}(z_s, y)

(T² only with ``temperature_scaling``), D one of :data:`DIVERGENCES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import InvalidArgumentError, InvalidTypeError
from ._options import make_options, real_number, unit_interval

#: "kl" = KL(p_t‖p_s) (forward), "reverse_kl" = KL(p_s‖p_t), "jsd" = β·KL(p_t‖m) + (1−β)·KL(p_s‖m)
DIVERGENCES = ("kl", "reverse_kl", "jsd")
#: what a top-k teacher does with the mass outside its k tokens (see :mod:`softxent._distill_teacher`)
TOPK_RESTS = ("renormalize", "ignore")


@dataclass(frozen=True)
class DistillOptions:
    """Scalar options of a distillation loss, already checked.

    Attributes:
        divergence: one of :data:`DIVERGENCES`.
        beta: β in [0, 1], the teacher's weight in the mixture m of ``"jsd"``.
        temperature: T in (0, 1e4]; both distributions are softmax(z/T).
        alpha: α in [0, 1], the weight of the hard-label cross-entropy.
        ignore_index: tokens whose target equals it count for nothing (None: every token counts).
        reduction: ``"mean"`` (over the tokens that count), ``"sum"`` or ``"none"``.
        topk_rest: one of :data:`TOPK_RESTS`.
        temperature_scaling: multiply the divergence by T² (Hinton et al.), so that its
            gradient keeps its size as T changes.
    """

    divergence: str = "kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.0
    ignore_index: int | None = -100
    reduction: str = "mean"
    topk_rest: str = "renormalize"
    temperature_scaling: bool = True

    @property
    def divergence_weight(self) -> float:
        """(1−α)·T² (or 1−α without temperature scaling): the factor of D in a token's loss."""
        scale = self.temperature**2 if self.temperature_scaling else 1.0
        return (1.0 - self.alpha) * scale


def make_distill_options(**given) -> DistillOptions:
    """Check the scalar options given as keywords (the fields of :class:`DistillOptions`; the
    others keep its defaults) and freeze them.

    Raises:
        ValueError / TypeError (:class:`~softxent.InvalidArgumentError`,
        :class:`~softxent.InvalidTypeError`) naming the offending argument; TypeError for a
        keyword that is not an option.
    """
    unknown = set(given) - set(DistillOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    fields = {**DistillOptions().__dict__, **given}
    divergence, topk_rest = fields["divergence"], fields["topk_rest"]
    ignore_index, reduction = fields["ignore_index"], fields["reduction"]
    temperature_scaling = fields["temperature_scaling"]
    base = make_options(ignore_index=ignore_index, reduction=reduction)
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise InvalidArgumentError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not isinstance(topk_rest, str) or topk_rest not in TOPK_RESTS:
        raise InvalidArgumentError(f"topk_rest must be one of {TOPK_RESTS}, got {topk_rest!r}")
    beta = unit_interval("beta", fields["beta"], "the teacher's weight in the JSD mixture")
    alpha = unit_interval("alpha", fields["alpha"], "the weight of the hard-label loss")
    temperature = real_number("temperature", fields["temperature"])
    if not 0.0 < temperature <= TEMPERATURE_MAX:
        raise InvalidArgumentError(
            f"temperature must be a number in (0, {TEMPERATURE_MAX:g}], got {temperature!r} (beyond, softmax(z/T) "
            "is so near uniform that the divergence is lost to float32 rounding)"
        )
    if not isinstance(temperature_scaling, bool):
        raise InvalidTypeError(f"temperature_scaling must be True or False, got {temperature_scaling!r}")
    return DistillOptions(
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        alpha=alpha,
        ignore_index=base.ignore_index,
        reduction=base.reduction,
        topk_rest=topk_rest,
        temperature_scaling=temperature_scaling,
    )


def distill_options(
    divergence: str,
    beta: float,
    temperature: float,
    alpha: float,
    ignore_index: int | None,
    reduction: str,
    topk_rest: str,
    temperature_scaling: bool,
) -> DistillOptions:
    """:func:`make_distill_options` of the options in :class:`DistillOptions`' order, for the
    frontends whose functions take them one by one."""
    return make_distill_options(
        divergence=divergence, beta=beta, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
        reduction=reduction, topk_rest=topk_rest, temperature_scaling=temperature_scaling,
    )  # fmt: skip


def split_options(options: dict) -> tuple[DistillOptions, bool, bool]:
    """The keyword options of a ``*_grad`` function: (checked options, shift, return_stats);
    a TypeError for a keyword that is none of them."""
    options = dict(options)
    shift = options.pop("shift", False)
    return_stats = options.pop("return_stats", False)
    return make_distill_options(**options), shift, return_stats


def flat_options(opts: DistillOptions) -> tuple:
    """The options as the flat scalars of a custom-op schema (read back by :func:`options_from_flat`):
    (divergence, beta, temperature, alpha, ignore_index, use_ignore_index, reduction, topk_rest,
    temperature_scaling)."""
    use_ignore_index = opts.ignore_index is not None
    return (
        opts.divergence,
        opts.beta,
        opts.temperature,
        opts.alpha,
        opts.ignore_index if use_ignore_index else -100,
        use_ignore_index,
        opts.reduction,
        opts.topk_rest,
        opts.temperature_scaling,
    )


#: the largest temperature: p_s − p_t ≈ (z_s − z_t)/(T·V) then still keeps about 3 digits in float32
#: (at 1e10 the divergence came out negative)
TEMPERATURE_MAX = 1e4


def options_from_flat(*flat) -> DistillOptions:
    """:func:`flat_options` read back: (divergence, beta, temperature, alpha, ignore_index,
    use_ignore_index, reduction, topk_rest, temperature_scaling) — the values were validated when
    the options were made."""
    divergence, beta, temperature, alpha, ignore_index, use_ignore_index, reduction, topk_rest, scaling = flat
    return DistillOptions(
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index if use_ignore_index else None,
        reduction=reduction,
        topk_rest=topk_rest,
        temperature_scaling=scaling,
    )
