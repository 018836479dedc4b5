"""Fine-tune a tiny, randomly initialized Llama-style causal LM on CPU for a few steps, with and
without softxent's Hugging Face patch, and print the loss and the peak memory of each.

    python examples/finetune_tiny_causal_lm.py            # both variants, each in its own process
    python examples/finetune_tiny_causal_lm.py --variant patched --steps 3

The model is small (2 layers, hidden 64) but the vocabulary is a real one (32000), so the
output layer dominates memory, as in a real LM: unpatched, transformers materializes the
N×V logits, their log-softmax and their gradient; patched, softxent computes the same loss
from the hidden states one chunk of tokens at a time.  Peak memory is the process's peak
resident set during the training steps, above what it held before them (Linux /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set
    except OSError:
        pass


def run(variant: str, steps: int, vocab: int, batch: int, length: int) -> dict:
    import torch
    import transformers

    from softxent import transformers as sxtf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=length, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).train()
    if variant == "patched":
        sxtf.patch(model)  # the one line
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, vocab, (batch, length), generator=g) for _ in range(steps)]

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    step(batches[0][:1, :16])  # warm-up: kernels compiled, optimizer state allocated
    before = _rss_mib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    losses = [step(ids) for ids in batches]
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "losses": losses,
        "peak_mib": _rss_mib("VmHWM") - before,
        "seconds_per_step": seconds / steps,
        "tokens_per_step": batch * length,
        "vocab": vocab,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("both", "patched", "unpatched"), default="both")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one JSON line per variant")
    args = parser.parse_args()
    sizes = ["--steps", str(args.steps), "--vocab", str(args.vocab), "--batch", str(args.batch)]
    sizes += ["--length", str(args.length)]
    if args.variant != "both":
        result = run(args.variant, args.steps, args.vocab, args.batch, args.length)
        print(json.dumps(result) if args.json else result)
        return
    results = []
    for variant in ("unpatched", "patched"):  # separate processes: each peak is its own
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--variant", variant, "--json", *sizes],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    tokens = results[0]["tokens_per_step"]
    print(f"tiny Llama, vocabulary {args.vocab}, {tokens} tokens per step, {args.steps} AdamW steps on CPU")
    print(f"{'':10} {'loss per step':>44}  {'peak MiB':>9}  {'s/step':>7}")
    for r in results:
        losses = " ".join(f"{x:.4f}" for x in r["losses"])
        print(f"{r['variant']:10} {losses:>44}  {r['peak_mib']:9.0f}  {r['seconds_per_step']:7.2f}")
    ratio = results[1]["peak_mib"] / results[0]["peak_mib"]
    print(f"patched peak memory: {ratio:.0%} of unpatched")


if __name__ == "__main__":
    main()
