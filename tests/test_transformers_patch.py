"""softxent.transformers: a patched Hugging Face causal LM gives the unpatched model's loss,
gradients and training trajectory without materializing the logits; generation is unchanged."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

from softxent import transformers as sxtf  # noqa: E402

COMMON = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

ARCHITECTURES = {
    "Llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "Llama-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "Mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON)),
    "Qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
    "Qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=16)),
    "Gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**COMMON, head_dim=16, final_logit_softcapping=5.0)
    ),
    "Gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**COMMON, head_dim=16, final_logit_softcapping=5.0)
    ),
    "Phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON)),
    "Gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**COMMON, head_dim=16)),
    "Phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**COMMON)),  # lm_head has a bias
    "Olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**COMMON)),
    "Cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.3)),
    "Granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**COMMON, logits_scaling=4.0)),
}


def _pair(name: str, seed: int = 0):
    torch.manual_seed(seed)
    reference = ARCHITECTURES[name]().float().train()
    patched = sxtf.patch(copy.deepcopy(reference))
    return reference, patched


def _batch(seed: int = 0, batch: int = 2, length: int = 17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    labels[1, -3:] = -100
    return ids, mask, labels


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_patched_loss_and_every_gradient_equal_the_unpatched_model(name):
    reference, patched = _pair(name)
    ids, mask, labels = _batch()
    want = reference(input_ids=ids, attention_mask=mask, labels=labels)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits is None and want.logits is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    want_grads, got_grads = _grads(reference), _grads(patched)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 10
    for key, value in want_grads.items():
        torch.testing.assert_close(got_grads[key], value, rtol=1e-4, atol=1e-6, msg=key)
    if name == "Llama-tied":
        assert patched.lm_head.weight is patched.model.embed_tokens.weight
    if name == "Phi":
        assert patched.lm_head.bias is not None and "lm_head.bias" in got_grads


@pytest.mark.parametrize("name", ["Llama", "Gemma2", "Qwen3"])
def test_num_items_in_batch_shift_labels_and_tuples_as_transformers(name):
    reference, patched = _pair(name)
    ids, mask, labels = _batch()
    for kwargs in ({"num_items_in_batch": torch.tensor(50)}, {"num_items_in_batch": 7}):
        want = reference(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss, want)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[0, 5] = -100
    want = reference(input_ids=ids, labels=labels, shift_labels=shifted).loss
    torch.testing.assert_close(patched(input_ids=ids, labels=labels, shift_labels=shifted).loss, want)
    as_tuple = patched(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], reference(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("name", ["Llama", "Gemma2", "Phi3"])
def test_bf16_autocast_within_bf16_rounding(name):
    reference, patched = _pair(name)
    ids, mask, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    want.backward()
    got.backward()
    for key, value in _grads(reference).items():
        g = _grads(patched)[key]
        assert torch.linalg.vector_norm(g - value) <= 0.1 * torch.linalg.vector_norm(value) + 1e-4, key


@pytest.mark.parametrize("name", ["Llama", "Gemma3", "Mistral"])
def test_a_few_optimizer_steps_follow_the_same_trajectory(name):
    reference, patched = _pair(name)
    losses = {}
    for key, model in (("reference", reference), ("patched", patched)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[key] = []
        for step in range(4):
            ids, mask, labels = _batch(seed=step % 2)  # two batches, seen twice: the loss falls
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[key].append(loss.item())
    assert losses["patched"] == pytest.approx(losses["reference"], rel=1e-4)
    assert losses["patched"][-1] < losses["patched"][0]


@pytest.mark.parametrize("name", ["Llama", "Gemma2"])
def test_generation_and_eval_are_unchanged(name):
    reference, patched = _pair(name)
    reference.eval()
    patched.eval()
    ids, mask, labels = _batch()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, labels=labels)
        got = patched(input_ids=ids, attention_mask=mask, labels=labels)  # eval mode: the original forward
        torch.testing.assert_close(got.logits, want.logits)
        torch.testing.assert_close(got.loss, want.loss)
        torch.testing.assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits)
        out_want = reference.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        out_got = patched.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(out_got, out_want)
    sxtf.patch(patched, fuse_in_eval=True)
    with torch.no_grad():
        fused = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, want.loss)


def test_patch_class_context_manager_and_unpatch():
    torch.manual_seed(0)
    model = ARCHITECTURES["Qwen2"]().train()
    ids, _, labels = _batch()
    with sxtf.patched(model):
        assert model(input_ids=ids, labels=labels).logits is None
    assert model(input_ids=ids, labels=labels).logits is not None
    cls = type(model)
    original = cls.forward
    try:
        sxtf.patch_class(cls)
        sxtf.patch_class(cls)  # twice: still one wrapper around the original
        assert cls.forward._softxent_original is original
        assert ARCHITECTURES["Qwen2"]().train()(input_ids=ids, labels=labels).logits is None
        sxtf.patch(model)  # an instance of a patched class: wraps the original once
        assert model.forward._softxent_original is original
    finally:
        sxtf.unpatch_class(cls)
        sxtf.unpatch(model)
    assert cls.forward is original
    assert model(input_ids=ids, labels=labels).logits is not None


def test_an_unknown_architecture_is_refused():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(sxtf.UnsupportedModelError, match="GPT2LMHeadModel"):
        sxtf.patch(model)
    with pytest.raises(sxtf.UnsupportedModelError):
        sxtf.patch_class(transformers.GPT2LMHeadModel)


def test_forward_and_backward_peak_memory_is_lower_when_patched():
    """Peak resident memory of one training step at V = 32000, each variant in its own process."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune_tiny_causal_lm.py")
    peaks = {}
    for variant in ("unpatched", "patched"):
        out = subprocess.run(
            [sys.executable, example, "--variant", variant, "--steps", "1", "--json"],
            capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["patched"]["losses"] == pytest.approx(peaks["unpatched"]["losses"], rel=1e-4)
    assert peaks["patched"]["peak_mib"] < 0.6 * peaks["unpatched"]["peak_mib"], peaks


def test_logits_to_keep_slices_the_hidden_states_as_the_model_does():
    reference, patched = _pair("Llama")
    ids, _, labels = _batch()
    keep = 6
    want = reference(input_ids=ids, labels=labels[:, -keep:], logits_to_keep=keep).loss
    got = patched(input_ids=ids, labels=labels[:, -keep:], logits_to_keep=keep).loss
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="target"):  # labels that do not match the kept positions: a clear error
        patched(input_ids=ids, labels=labels, logits_to_keep=keep)
