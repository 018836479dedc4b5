"""Distil a tiny Llama-style teacher into a smaller student on CPU with softxent's fused linear +
distillation loss — once with the teacher fused (``FusedTeacher``: its output layer runs chunk by
chunk beside the student's, neither model's logits ever exist whole) and once from the teacher's
top-k log-probabilities (``TopK``, what an inference server hands out).

    python examples/distill_tiny_causal_lm.py            # ~30 s on 2 CPU cores
    python examples/distill_tiny_causal_lm.py --steps 60 --top-k 8

Both models are random ``transformers.LlamaForCausalLM``s made here.  The teacher first learns a
toy language (each sequence counts up by a step of its own, modulo the vocabulary) with softxent's
fused cross-entropy; then each student starts from the same weights and learns from the teacher:
loss = (1 − α)·T²·KL(p_teacher‖p_student) + α·CE(labels), at temperature T, with the causal shift
done on the labels (``shift=True``: position t of both models predicts token t + 1).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import softxent.torch as sxt


def make_model(vocab: int, hidden: int, layers: int, length: int, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def toy_batch(gen: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Sequences start, start + s, start + 2s, … (mod V), each with its own start and step s ∈ {1, 2, 3}."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    step = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + step * torch.arange(length)) % vocab


def last_hidden(model: transformers.LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states the output layer reads (after the final norm)."""
    return model.model(input_ids=ids).last_hidden_state


def train_teacher(teacher, batches, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    losses = []
    for ids in batches:
        loss = sxt.linear_cross_entropy(last_hidden(teacher, ids), teacher.lm_head.weight, ids, shift=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def teacher_signal(teacher, ids: torch.Tensor, kind: str, k: int):
    """The teacher as the loss takes it: a FusedTeacher (its last hidden states and output layer), or
    the TopK of its log-probabilities (computed here from its logits; typically precomputed offline)."""
    with torch.no_grad():
        hidden = last_hidden(teacher, ids)
        if kind == "fused":
            return sxt.FusedTeacher(hidden, teacher.lm_head.weight)
        top = torch.log_softmax(teacher.lm_head(hidden).float(), dim=-1).topk(k, dim=-1)
        return sxt.TopK(top.indices, top.values)


def distil(student, teacher, batches, kind: str, k: int, lr: float, alpha: float, temperature: float):
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    history = []
    for ids in batches:
        loss, stats = sxt.linear_distill_loss(
            last_hidden(student, ids), student.lm_head.weight, teacher_signal(teacher, ids, kind, k), ids,
            alpha=alpha, temperature=temperature, shift=True, return_stats=True,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append((loss.item(), float(stats.agreement)))
    return history


def next_token_accuracy(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (predicted == ids[:, 1:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--steps", type=int, default=30, help="distillation steps per student")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    began = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    make = lambda steps: [toy_batch(gen, args.batch, args.length, args.vocab) for _ in range(steps)]  # noqa: E731
    teacher_batches, student_batches, held_out = make(args.teacher_steps), make(args.steps), make(1)[0]

    teacher = make_model(args.vocab, 96, 2, args.length, seed=1).train()
    losses = train_teacher(teacher, teacher_batches, lr=3e-3)
    teacher.eval().requires_grad_(False)
    print(f"teacher (hidden 96, 2 layers): cross-entropy {losses[0]:.3f} → {losses[-1]:.3f}, "
          f"held-out next-token accuracy {next_token_accuracy(teacher, held_out):.1%}")  # fmt: skip

    untrained = make_model(args.vocab, 48, 1, args.length, seed=2)
    print(f"student (hidden 48, 1 layer) before distillation: accuracy {next_token_accuracy(untrained, held_out):.1%}")
    for kind in ("fused", "topk"):
        student = make_model(args.vocab, 48, 1, args.length, seed=2).train()
        history = distil(student, teacher, student_batches, kind, args.top_k, 3e-3, args.alpha, args.temperature)
        label = "FusedTeacher" if kind == "fused" else f"TopK(k={args.top_k})"
        (first, agree_first), (last, agree_last) = history[0], history[-1]
        print(f"{label:>13}: loss {first:.3f} → {last:.3f}, top-1 agreement {agree_first:.1%} → {agree_last:.1%}, "
              f"held-out accuracy {next_token_accuracy(student.eval(), held_out):.1%}")  # fmt: skip
    print(f"done in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
