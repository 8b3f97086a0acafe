"""Batched generation over an engine: prefill a batch, decode until every request ends.

Requests leave the batch (and free their KV blocks) as soon as they finish. The continuous
batching scheduler, where requests also join between steps, builds on the same engine calls.

On an engine that can queue a step before the last one's tokens are read (`overlap_decode`,
the torch engine on CUDA), greedy batches run one step ahead: step n+1 is queued with step n's
tokens still on the device, and the host reads and accepts step n's tokens while the GPU runs
n+1. A request that stops on EOS wastes its row of the step queued after it; requests that stop
for length are known a step ahead and never get one.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import Engine, SequenceInput
from .sampling import Sampler, SamplingParams, all_greedy, next_token

_seq_ids = itertools.count()


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    image_embeds: Any = None  # from engine.encode_images, one per <image> in the prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    image_keys: list[str] | None = None  # content keys of the images (kv_cache.image_key): prefix caching


@dataclass
class GenerationOutput:
    token_ids: list[int]  # generated tokens, without the stop token
    finish_reason: str  # "stop": EOS or a stop token; "length": max_new_tokens or the context is full
    prompt_tokens: int
    ttft_s: float  # from the call to the first token
    total_s: float


def check_prompt_fits(n_prompt: int, max_context: int) -> None:
    if n_prompt >= max_context:
        raise ValueError(
            f"the prompt is {n_prompt} tokens but the model's context is {max_context}; "
            "shorten the question (an image takes image_seq_length tokens)"
        )


def generate(
    engine: Engine,
    requests: list[GenerationRequest],
    eos_token_ids: set[int],
    on_token: Callable[[int, int], None] | None = None,
) -> list[GenerationOutput]:
    """Generate for all requests together; on_token(request_index, token_id) streams tokens."""
    for r in requests:
        check_prompt_fits(len(r.prompt_ids), engine.max_context)
    start = time.perf_counter()
    seq_ids = [next(_seq_ids) for _ in requests]
    samplers = [Sampler(r.params) for r in requests]
    tokens: list[list[int]] = [[] for _ in requests]
    first: list[float | None] = [None] * len(requests)
    reasons: list[str | None] = [None] * len(requests)
    ends: list[float] = [0.0] * len(requests)

    def accept(i: int, token: int) -> None:
        now = time.perf_counter()
        if first[i] is None:
            first[i] = now - start
        params = requests[i].params
        if (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reasons[i] = "stop"
        else:
            tokens[i].append(token)
            if on_token is not None:
                on_token(i, token)
            full = len(requests[i].prompt_ids) + len(tokens[i]) >= engine.max_context  # no room to decode it
            if len(tokens[i]) >= params.max_new_tokens or full:
                reasons[i] = "length"
        if reasons[i] is not None:
            ends[i] = now - start
            r = requests[i]
            engine.release(seq_ids[i], r.prompt_ids + tokens[i], r.image_keys)  # keeps its blocks cached

    try:
        logits = engine.prefill(
            [SequenceInput(s, r.prompt_ids, r.image_embeds, r.image_keys) for s, r in zip(seq_ids, requests)]
        )
        for i in range(len(requests)):
            accept(i, samplers[i](logits[i]))
        if getattr(engine, "overlap_decode", False) and all_greedy(samplers):
            decode_overlapped(engine, requests, seq_ids, tokens, reasons, accept)
        while running := [i for i in range(len(requests)) if reasons[i] is None]:
            greedy = all_greedy([samplers[i] for i in running])
            out = engine.decode([seq_ids[i] for i in running], [tokens[i][-1] for i in running], greedy_only=greedy)
            for row, i in enumerate(running):
                accept(i, next_token(out[row], samplers[i], greedy))
    finally:
        for i, s in enumerate(seq_ids):
            if reasons[i] is None:
                engine.release(s)
    return [
        GenerationOutput(tokens[i], reasons[i], len(r.prompt_ids), first[i], ends[i])
        for i, r in enumerate(requests)
    ]


def decode_overlapped(engine, requests, seq_ids, tokens, reasons, accept) -> None:
    """Greedy decoding one step ahead (see the module docstring) until every request has ended."""

    def may_continue(i: int) -> bool:  # after the token now pending: False if that one is its last for length
        n = len(tokens[i]) + 1
        return n < requests[i].params.max_new_tokens and len(requests[i].prompt_ids) + n < engine.max_context

    rows = [i for i in range(len(requests)) if reasons[i] is None]  # the request in each row of `pending`
    pending = engine.decode_async([seq_ids[i] for i in rows], [tokens[i][-1] for i in rows]) if rows else None
    while pending is not None:
        ahead = [row for row, i in enumerate(rows) if reasons[i] is None and may_continue(i)]
        queued = engine.decode_async([seq_ids[rows[row]] for row in ahead], (pending, ahead)) if ahead else None
        out = pending.result()
        for row, i in enumerate(rows):
            if reasons[i] is None:  # else it stopped on EOS a step ago and this row was wasted
                accept(i, int(out[row]))
        rows, pending = [rows[row] for row in ahead], queued

