"""A tiny randomly initialised Llama for the transformers-patch tests (float32, train mode)."""

import torch
import transformers

VOCAB = 256


def tiny_llama(tied: bool = False):
    """LlamaForCausalLM: vocabulary 256, hidden 32, two layers, seeded (the same weights every call)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().train()
