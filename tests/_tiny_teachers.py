"""Tiny teachers for the loader tests: a byte-level BPE tokenizer with a ChatML template, a small
random Llama, and a writer that stores both as a float32 GGUF the way llama.cpp lays one out."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = "<|im_start|>", "<|im_end|>"

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough merges to make "hello world" two tokens, so a test sees whether merges were kept.
MERGES = [
    ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"),
    ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"),
]  # fmt: skip


def tiny_vocab() -> list[str]:
    """Specials, the 256 byte-level symbols, then one token per merge."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + [a + b for a, b in MERGES]


def tiny_tokenizer():
    """A fast tokenizer over `tiny_vocab`, with a chat template and deliberately no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tiny_vocab())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=SPECIALS[0])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_llama(*, tie_word_embeddings: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = tiny_vocab()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=vocab.index(BOS),
        eos_token_id=vocab.index(EOS),
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Norm weights start at exactly 1; perturb them so a mis-mapped norm shows in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
    return model.eval()


def _to_gguf_rotary_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF keeps each head's rotary dims as two halves; llama.cpp interleaves them in pairs."""
    out_features, in_features = weight.shape
    half = out_features // n_heads // 2
    return weight.reshape(n_heads, 2, half, in_features).transpose(1, 2).reshape(out_features, in_features)


def write_llama_gguf(path: Path, model) -> Path:
    """Write `model` and the tiny tokenizer as an all-F32 llama GGUF."""
    import gguf

    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(
        config, "rope_theta", 10000.0
    )
    vocab = tiny_vocab()

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(vocab))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if token in SPECIALS else gguf.TokenType.NORMAL for token in vocab]
    )
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(vocab.index(BOS))
    writer.add_eos_token_id(vocab.index(EOS))
    writer.add_chat_template(CHATML)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp omits output.weight for tied embeddings
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.detach().float()
        if base.endswith("self_attn.q_proj"):
            data = _to_gguf_rotary_layout(data, config.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            data = _to_gguf_rotary_layout(data, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data.contiguous().numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
