"""Choosing the next token from the logits: greedy, temperature, top-k and top-p (nucleus).

Filters apply in the order transformers applies them (temperature, then top-k, then top-p), so
the same settings mean the same distribution in both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    temperature: 0 picks the most likely token (greedy); above 0 samples from softmax(logits / T).
    top_k: keep only the k most likely tokens (0 keeps all).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1 keeps all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Set every score below the k-th largest of its row to -inf."""
    k = min(k, scores.shape[-1])
    kth_largest = scores.topk(k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth_largest, float("-inf"))


def keep_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p; -inf for the rest."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    sorted_probs = sorted_scores.softmax(dim=-1)
    # A token is outside the nucleus if the tokens before it already reach p; the most likely
    # token has nothing before it, so it always stays.
    probability_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    outside_sorted = probability_before > p
    outside = outside_sorted.scatter(-1, order, outside_sorted)
    return scores.masked_fill(outside, float("-inf"))


# Compiled, an argmax over a whole vocabulary is one program per row: the draft's over SmolLM2's
# 49,152 logits took 8.2 us on the H200 at batch 1 (three per K = 3 round; benchmarks/
# profile_rounds.py, session 10). In two stages, the maximum of each chunk of ARGMAX_CHUNK logits
# and then the first chunk that holds the overall maximum, many programs share the reading.
ARGMAX_CHUNK = 1024


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``, the same index (the first maximum) for any input; in two stages
    inside compiled code where the last dimension spans several chunks. Eager, one aten kernel
    is cheaper than the stages' several."""
    vocab = logits.shape[-1]
    if not torch.compiler.is_compiling() or vocab < 4 * ARGMAX_CHUNK:
        return logits.argmax(-1)
    chunks = -(-vocab // ARGMAX_CHUNK)
    padded = torch.nn.functional.pad(logits, (0, chunks * ARGMAX_CHUNK - vocab), value=float("-inf"))
    best, within = padded.view(*logits.shape[:-1], chunks, ARGMAX_CHUNK).max(-1)  # first maximum of each chunk
    chunk = best.argmax(-1, keepdim=True)  # the first chunk holding the overall maximum
    return (chunk * ARGMAX_CHUNK + within.gather(-1, chunk))[..., 0]


def sample_next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (batch, vocab) -> the next token of each row (batch,)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k:
        scores = keep_top_k(scores, params.top_k)
    if params.top_p < 1:
        scores = keep_top_p(scores, params.top_p)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator)[:, 0]


__all__ = ["SamplingParams", "greedy_tokens", "keep_top_k", "keep_top_p", "sample_next_tokens"]
