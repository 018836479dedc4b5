"""Calling a custom op's implementation and autograd formula without the dispatcher, in
plain eager mode.

``torch.library.custom_op`` sends every call through the dispatcher and, for an op with an
autograd formula, through ``torch._library.autograd``, whose forward rebuilds the schema's
argument list once per argument (``fill_defaults``).  For ``softxent::cross_entropy`` (11
arguments) a forward + backward of a 64×10 batch on CPU took 245 µs through the op against
107 µs for the same implementation and formula in an ``autograd.Function`` (2-core AMD EPYC,
torch 2.13; the kernel is 12 µs of it).  Where nothing can observe the dispatcher,
:func:`call` runs the op's own implementation inside a ``torch.autograd.Function`` built from
the very ``setup_context`` and ``backward`` the op registers: the same numbers and the same
autograd graph, without the detour.

"Nothing can observe it" (:func:`plain_eager`): not inside ``torch.compile``/dynamo, TorchScript
or ``torch.jit.trace``; no TorchDispatchMode (FakeTensorMode, FunctionalTensorMode, make_fx,
FlopCounterMode, …), no TorchFunctionMode and no profiler active (a trace names the op); every
tensor argument a plain ``torch.Tensor`` (or ``nn.Parameter``) on the CPU or a CUDA device, not a
negative- or conjugate-bit view nor a ZeroTensor (which the dispatcher materializes).  Everything
else — and every direct use of the op (``torch.ops.softxent.…``, ``opcheck``) — takes the
registered op.  What differs on the direct path: the autograd node's name
(``CrossEntropyFunctionBackward``), and a kernel or formula a user registers for the op
themselves is not called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: the tensor types that carry no behaviour of their own (a Parameter's __torch_function__ is disabled)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
#: the devices whose tensors the ops' implementations take directly
_DIRECT_DEVICES = ("cpu", "cuda")
_PYTHON_KEY = torch._C.DispatchKey.Python


def plain_eager(tensors: tuple[Tensor, ...]) -> bool:
    """True when a call of a custom op on ``tensors`` is observed by nothing but autograd:
    eager mode, no tracing, no Python dispatch or function mode, plain CPU/CUDA tensors."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch._C._are_functorch_transforms_active():  # vmap, grad, jvp: their own wrappers
        return False
    # any TorchDispatchMode (user or infrastructure: fake, functional, proxy) puts the Python
    # key in this thread's include set
    if torch._C._dispatch_tls_local_include_set().has(_PYTHON_KEY) or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._autograd._profiler_enabled():  # a trace names the op
        return False
    return all(_plain(t) for t in tensors)


def _plain(t: Tensor) -> bool:
    # negative- and conjugate-bit views and ZeroTensors are materialized by the dispatcher's
    # fallbacks before an op's kernel sees them
    return (
        type(t) in _PLAIN_TYPES
        and t.device.type in _DIRECT_DEVICES
        and not (t.is_neg() or t.is_conj() or t._is_zerotensor())
    )


def autograd_function(name: str, implementation: Callable, setup_context: Callable, backward: Callable, leading: int):
    """A ``torch.autograd.Function`` class named ``name`` that runs ``implementation(*args)`` and
    the op's ``setup_context(ctx, args, output)`` and ``backward(ctx, *grads)``.

    Its ``apply`` takes the op's first ``leading`` arguments (those that may be tensors) one by one
    and the others as one tuple: ``apply(a_0, …, a_{leading−1}, (a_leading, …))`` — each argument
    of ``apply`` costs time of its own.  Old-style (``forward(ctx, …)``): a ``setup_context``
    staticmethod would make every ``apply`` bind the forward's signature with ``inspect``."""

    def forward(ctx, *args):
        args = (*args[:leading], *args[leading])
        output = implementation(*args)
        setup_context(ctx, args, output)
        return output

    def backward_of_apply(ctx, *grads):
        result = backward(ctx, *grads)  # one gradient, or one for each argument of the op
        return (*(result if isinstance(result, tuple) else (result,))[:leading], None)

    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward_of_apply),
            "leading": leading,
            "__doc__": f"{name}: a custom op's implementation and autograd formula, called directly.",
        },
    )


def call(op, implementation: Callable, function, *args):
    """``op(*args)``, or — where :func:`plain_eager` — the same computation without the
    dispatcher: ``function.apply`` (an :func:`autograd_function` of the op) when autograd records
    it (grad mode on and a tensor argument requiring grad), ``implementation(*args)`` otherwise, as
    ``torch._library``'s own autograd kernel does.  ``function`` None: an op without an autograd
    formula, which then always takes the op when autograd records.  ``args`` must list every
    argument of the op's schema, defaults included."""
    tensors = tuple(a for a in args if isinstance(a, Tensor))
    if not plain_eager(tensors):  # first: under torch.compile nothing else here is traced
        return op(*args)
    # inference mode takes autograd out of the dispatcher even with grad mode on
    records = (
        torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and any(t.requires_grad for t in tensors)
    )
    if records and function is None:
        return op(*args)
    if records:
        return function.apply(*args[: function.leading], args[function.leading :])
    return implementation(*args)
