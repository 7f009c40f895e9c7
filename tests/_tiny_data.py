"""Tiny builders for the data and loss tests: a byte-level BPE tokenizer with a ChatML
template, and a small random Llama."""

from __future__ import annotations

import functools

import torch

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tell me about the Eiffel Tower. It is a wrought-iron lattice tower in Paris.",
    "What is photosynthesis? Plants turn light, water and carbon dioxide into sugar.",
    "Write a short paragraph about the Moon, the only natural satellite of the Earth.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Mamba is a state space model; attention is a transformer layer.",
] * 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(chat_template: str = CHATML):
    """Byte-level BPE (decoding is exact), specials <pad> <s> <|im_start|> <|im_end|>; adds <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", chat_template=chat_template)


def tiny_llama(tokenizer, seed: int = 0):
    """A random 2-layer Llama over the tiny tokenizer's vocabulary, in eval mode.

    A larger init range than usual makes the logits peaked, so greedy decoding has no near-ties
    that float noise could flip.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
