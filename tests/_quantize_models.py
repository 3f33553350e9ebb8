"""Tiny random causal LMs for the quantizer tests (built with transformers, no download)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320


def tiny_config(arch: str):
    """A tiny config: hidden 64, 4 query heads and 2 KV heads of 16, 2 layers.

    The Llama one has intermediate 120, so its down_proj has in_features 120 (not a
    multiple of 16): it must be left in bf16 and listed in ``ignore``.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(intermediate_size=120, head_dim=16, **common)
    if arch == "qwen2":  # q/k/v with bias
        return Qwen2Config(intermediate_size=128, **common)
    if arch == "qwen3":  # q/k norms before the rotary embedding
        return Qwen3Config(intermediate_size=96, head_dim=16, **common)
    raise ValueError(arch)


def save_tiny_model(arch: str, path: Path, seed: int = 0, std: float = 0.05) -> Path:
    """Build a tiny random model (bf16-representable fp32 weights) and save it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.initializer_range = std
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # heavier tails than the init: blocks with outliers
                p.copy_(torch.distributions.StudentT(4.0).sample(p.shape) * std)
    model.save_pretrained(path)
    return path


def save_tiny_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer trained on a few sentences (vocab < VOCAB)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "NVFP4 stores four-bit values with an FP8 scale per block of sixteen.",
        "Paris is the capital of France; Rome is the capital of Italy.",
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    tok.save_pretrained(path)


def calib_tokens(n: int = 8, seq_len: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)
