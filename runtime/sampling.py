"""Token sampling on numpy logits: greedy, temperature, top-k, top-p, per-request seeds.

Numpy so that every engine (torch, onnxruntime) shares it. Each request owns its random
generator, so what it samples never depends on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


class Sampler:
    """Samples one request's tokens; transformers' order: temperature, top-k, top-p."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < scores.shape[-1]:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        if p.top_p < 1.0:
            # As transformers: drop the low tail whose total mass is at most 1 - top_p; keep the best token.
            order = np.argsort(scores, kind="stable")  # ascending
            probs = np.exp(scores[order] - scores[order[-1]])
            probs /= probs.sum()
            drop = np.cumsum(probs) <= 1.0 - p.top_p
            drop[-1] = False
            scores[order[drop]] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        return int(self.rng.choice(probs.shape[-1], p=probs))


def next_token(row: np.ndarray, sampler: Sampler, greedy_only: bool) -> int:
    """A request's next token from its row of an engine's output: the argmax token itself when the
    engine was called with greedy_only (see all_greedy), else logits for the request's sampler."""
    return int(row) if greedy_only else sampler(row)


def all_greedy(samplers: list[Sampler]) -> bool:
    """Whether a decode step may ask the engine for argmax tokens instead of logits."""
    return all(s.params.temperature == 0.0 for s in samplers)
