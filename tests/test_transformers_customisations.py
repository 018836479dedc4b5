"""softxent.transformers honours what a user changed on the model: a replaced
``loss_function``, hooks on ``lm_head``, an ``lm_head`` that is not a plain ``nn.Linear``
make the patched model run its original forward (with one warning), so its loss and
gradients are the customised model's; ``return_dict=False`` keeps the unpatched tuple's
layout; ``torch.compile`` of the patched model gives the unpatched loss and gradients."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from softxent import transformers as sxtf  # noqa: E402
from tiny_llama import VOCAB, tiny_llama  # noqa: E402


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _run_twice(model):
    """Two training forwards + backwards: the outputs and the softxent warnings they raised."""
    outputs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(2):
            model.zero_grad()
            ids, labels = _batch(seed)
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            outputs.append(out)
    return outputs, [str(w.message) for w in caught if "softxent" in str(w.message)]


def _assert_original_forward_ran(reference, patched, fragment: str):
    """The patched model computed the customised model's loss, logits and gradients, and said
    why (once) that it did not fuse."""
    want, _ = _run_twice(reference)
    got, messages = _run_twice(patched)
    for w, g in zip(want, got, strict=True):
        assert g.logits is not None, "the original forward builds the logits"
        torch.testing.assert_close(g.loss, w.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.logits, w.logits, rtol=1e-6, atol=1e-6)
    want_grads, got_grads = _grads(reference), _grads(patched)
    assert want_grads.keys() == got_grads.keys()
    for key, value in want_grads.items():
        torch.testing.assert_close(got_grads[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert len(messages) == 1, messages  # one warning per model, not one per step
    assert fragment in messages[0] and "original forward" in messages[0], messages[0]


def _pair(customise, tied: bool = False):
    """The unpatched and the patched model, both customised the same way after patching."""
    reference = tiny_llama(tied)
    patched = sxtf.patch(copy.deepcopy(reference))
    customise(reference)
    customise(patched)
    return reference, patched


def _z_loss(logits, labels, vocab_size, **kwargs):
    return ForCausalLMLoss(logits, labels, vocab_size, **kwargs) + 1e-2 * logits.float().logsumexp(-1).pow(2).mean()


# --- (a) a replaced loss_function ---------------------------------------------------------


def test_a_loss_function_set_on_the_instance_is_used():
    def customise(model):
        model.loss_function = _z_loss

    _assert_original_forward_ran(*_pair(customise), "loss_function is _z_loss")


def test_a_loss_function_property_overridden_on_the_class_is_used(monkeypatch):
    reference, patched = _pair(lambda model: None)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "loss_function", property(lambda self: _z_loss))
    _assert_original_forward_ran(reference, patched, "loss_function is _z_loss")


def test_another_loss_type_is_used():
    def customise(model):
        model.loss_type = "ForMaskedLM"  # the stock property then gives ForMaskedLMLoss (no shift)

    _assert_original_forward_ran(*_pair(customise), "ForMaskedLMLoss")


# --- (b) hooks on lm_head ---------------------------------------------------------------------


def test_a_forward_hook_on_lm_head_runs():
    def customise(model):
        model.lm_head.register_forward_hook(lambda module, inputs, output: output * 0.5)

    _assert_original_forward_ran(*_pair(customise), "forward hook on lm_head")


def test_a_forward_pre_hook_on_lm_head_runs():
    def customise(model):
        model.lm_head.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2.0,))

    _assert_original_forward_ran(*_pair(customise, tied=True), "forward pre-hook on lm_head")


def test_a_full_backward_hook_on_lm_head_runs():
    def customise(model):
        model.lm_head.register_full_backward_hook(lambda module, grad_input, grad_output: (grad_input[0] * 3.0,))

    _assert_original_forward_ran(*_pair(customise), "backward hook on lm_head")


@pytest.mark.parametrize("kind,fragment", [("forward", "forward hook"), ("forward_pre", "forward pre-hook")])
def test_a_global_module_hook_runs(kind, fragment):
    from torch.nn.modules import module as nn_module

    reference, patched = _pair(lambda model: None)

    def scale_the_head(module, args, output=None):
        if isinstance(module, torch.nn.Linear) and module.out_features == VOCAB:
            return output * 0.5 if kind == "forward" else (args[0] * 0.5,)
        return None

    register = getattr(nn_module, f"register_module_{kind}_hook")
    handle = register(scale_the_head)
    try:
        _assert_original_forward_ran(reference, patched, f"global module {fragment}")
    finally:
        handle.remove()


# --- (c) an lm_head that is not a plain nn.Linear -------------------------------------------------


class LoRALinear(torch.nn.Linear):
    """A LoRA-style head: W h + B A h."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight = base.weight
        g = torch.Generator().manual_seed(1)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.3)

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_a.T) @ self.lora_b.T


class FakeQuantLinear(torch.nn.Linear):
    """A quantised head (fake-quantised to 16 levels per row)."""

    def forward(self, x):
        scale = self.weight.abs().amax(1, keepdim=True) / 7
        q = self.weight + ((self.weight / scale).round() * scale - self.weight).detach()
        return torch.nn.functional.linear(x, q, self.bias)


class ScaledHead(torch.nn.Module):
    """Not an nn.Linear at all."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.weight = base.weight

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * 0.7


def _fake_quant(model):
    head = FakeQuantLinear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head


@pytest.mark.parametrize(
    "customise,fragment",
    [
        (lambda model: setattr(model, "lm_head", LoRALinear(model.lm_head)), "LoRALinear, whose own forward"),
        (_fake_quant, "FakeQuantLinear, whose own forward"),
        (lambda model: setattr(model, "lm_head", ScaledHead(model.lm_head)), "ScaledHead, not an nn.Linear"),
    ],
    ids=["lora", "fake-quant", "not-a-linear"],
)
def test_an_lm_head_with_its_own_forward_runs_it(customise, fragment):
    _assert_original_forward_ran(*_pair(customise), fragment)


def test_a_forward_set_on_the_lm_head_instance_runs():
    def customise(model):
        head = model.lm_head
        head.forward = lambda x: torch.nn.functional.linear(x, head.weight) * 0.5  # as accelerate's hooks do

    _assert_original_forward_ran(*_pair(customise), "forward of its own")


def test_a_weight_of_a_tensor_subclass_is_not_fused():
    class QuantizedParameter(torch.nn.Parameter):
        pass

    def customise(model):
        model.lm_head.weight = QuantizedParameter(model.lm_head.weight.detach().clone())

    _assert_original_forward_ran(*_pair(customise), "lm_head.weight is a")


def test_a_plain_linear_and_a_subclass_without_a_forward_stay_fused():
    class NamedLinear(torch.nn.Linear):
        pass

    for customise in (lambda model: None, lambda model: setattr(model.lm_head, "__class__", NamedLinear)):
        reference, patched = _pair(customise)
        want, _ = _run_twice(reference)
        got, messages = _run_twice(patched)
        assert messages == [] and all(g.logits is None for g in got)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g.loss, w.loss, rtol=1e-6, atol=1e-6)
        for key, value in _grads(reference).items():
            torch.testing.assert_close(_grads(patched)[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_a_customisation_undone_fuses_again_and_causal_lm_loss_refuses_a_custom_head():
    reference, patched = _pair(lambda model: None)
    handle = patched.lm_head.register_forward_hook(lambda module, inputs, output: output)
    ids, labels = _batch()
    with pytest.warns(UserWarning, match="forward hook on lm_head"):
        assert patched(input_ids=ids, labels=labels).logits is not None
    hidden = patched.model(input_ids=ids).last_hidden_state
    with pytest.raises(sxtf.UnsupportedModelError, match="forward hook on lm_head"):
        sxtf.causal_lm_loss(patched, hidden, labels)
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = patched(input_ids=ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, reference(input_ids=ids, labels=labels).loss, rtol=1e-6, atol=1e-6)


# --- (d) return_dict=False -----------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_return_dict_false_keeps_the_unpatched_tuple_layout_with_none_for_the_logits(use_cache):
    reference, patched = _pair(lambda model: None)
    ids, labels = _batch()
    kwargs = dict(input_ids=ids, labels=labels, use_cache=use_cache, output_hidden_states=True, return_dict=False)
    want = reference(**kwargs)
    got = patched(**kwargs)
    assert isinstance(got, tuple) and len(got) == len(want)
    assert got[1] is None and torch.is_tensor(want[1]) and want[1].shape[-1] == VOCAB
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for w, g in zip(want[2:], got[2:], strict=True):
        assert type(g) is type(w)
        if isinstance(w, tuple):  # the hidden states of every layer
            for a, b in zip(w, g, strict=True):
                torch.testing.assert_close(b, a)
    as_dict = patched(input_ids=ids, labels=labels, use_cache=use_cache, return_dict=True)
    assert as_dict.logits is None


# --- torch.compile -------------------------------------------------------------------------------


def test_torch_compile_of_the_patched_model_gives_the_unpatched_loss_and_gradients():
    reference = tiny_llama()
    patched = sxtf.patch(copy.deepcopy(reference))
    compiled = torch.compile(patched, backend="aot_eager")  # inductor would take a minute to compile on CPU
    for seed in range(2):
        ids, labels = _batch(seed)
        reference.zero_grad()
        patched.zero_grad()
        want = reference(input_ids=ids, labels=labels)
        got = compiled(input_ids=ids, labels=labels)
        assert got.logits is None
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        want.loss.backward()
        got.loss.backward()
        for key, value in _grads(reference).items():
            torch.testing.assert_close(_grads(patched)[key], value, rtol=1e-5, atol=1e-7, msg=key)
    # a hook registered before compiling: the compiled model runs the original forward.  (torch.compile
    # does not guard on hooks: a compiled unpatched model does not see a hook added later either, even
    # compiled again, until torch.compiler.reset())
    for model in (reference, patched):
        model.lm_head.register_forward_hook(lambda module, inputs, output: output * 0.5)
    torch.compiler.reset()
    compiled = torch.compile(patched, backend="aot_eager")
    ids, labels = _batch(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [compiled(input_ids=ids, labels=labels) for _ in range(2)]
    assert len([w for w in caught if "forward hook on lm_head" in str(w.message)]) == 1
    want = reference(input_ids=ids, labels=labels)
    for got in outputs:
        assert got.logits is not None
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
