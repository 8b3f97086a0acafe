"""Continuous batching over an engine: requests join and leave the running batch between steps.

One step = one decode call for every running request that is past its prompt, then one prefill
call for prompt chunks of requests still reading theirs (at most max_prefill_tokens, so a long
prompt never stalls decoding by more than a chunk). Waiting requests are admitted while the KV
cache has blocks for their prompt; when decode runs out of blocks anyway, the newest request is
preempted: its blocks are freed and it is recomputed later (prompt by prefill, the tokens it
already generated replayed one per decode step, so the replay computes what the first pass did).
Images of the requests admitted in a step are encoded in one call and cached by content hash.
With prefix caching (the torch engine), a request starts on the cached KV blocks of its prompt's
start, and one whose next block an admitted request is still computing waits for it. On an engine
that can queue a decode step before the host has read the last one's tokens (overlap_decode: the
torch engine on CUDA), greedy decoding runs one step ahead, as generate() does: each step queues
the next decode, fed from the device tokens of the one queued a step before, then reads and
accepts those while the GPU runs.

Only the engine interface is used (runtime/engine.py), so the torch and onnxruntime engines
both run under it. Not thread-safe: one thread calls add/abort/step (AsyncLLM owns that thread).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from llava_rt.tokenizer import StreamingDetokenizer, TextProcessor

from .engine import Engine, SequenceInput
from .generate import check_prompt_fits
from .kv_cache import CacheFullError, image_key
from .sampling import Sampler, SamplingParams, all_greedy, next_token

_seq_ids = itertools.count(1 << 20)  # apart from generate()'s ids, should both share an engine


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32  # running requests at most: the decode batch
    max_prefill_tokens: int = 512  # prompt tokens per step; bounds the stall a prefill puts on decoding
    image_cache_size: int = 128  # image embeddings kept by content hash


@dataclass(eq=False)
class ImageInput:
    pixels: np.ndarray  # [3, H, W] float32, preprocessed
    key: str  # content hash of the pixels

    @classmethod
    def from_pixels(cls, pixels: np.ndarray) -> list["ImageInput"]:
        return [cls(p, image_key(p)) for p in pixels]


@dataclass
class RequestOutput:
    request_id: str
    delta: str  # text new since the last output (held back while it may be the start of a stop string)
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    prompt_tokens: int
    error: str | None = None
    ttft_s: float | None = None  # arrival to first token
    latency_s: float | None = None  # arrival to finish


@dataclass(eq=False)  # identity: requests are found in the running list by who they are
class Request:
    prompt_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    on_output: Callable[[RequestOutput], None] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Scheduler state.
    seq_id: int = -1
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of prompt_ids + output_ids in the KV cache
    embeds: Any = None
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    sampler: Sampler | None = None
    detok: StreamingDetokenizer | None = None
    num_preemptions: int = 0
    prefix_todo: list = field(default_factory=list)  # prefix-cache keys of the prompt blocks it computes
    ahead: bool = False  # its next token is in a decode step queued and not read yet (overlap_decode)

    @property
    def in_prompt(self) -> bool:
        return self.num_computed < len(self.prompt_ids)


def _concat(parts: list) -> Any:
    """Per-image embedding handles back into one (numpy, a torch tensor or VisionFeatures)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch  # only torch engines hand out non-numpy handles

    if hasattr(parts[0], "features"):  # the kernels path's un-projected VisionFeatures
        return type(parts[0])(torch.cat([p.features for p in parts]), parts[0].use_kernels)
    return torch.cat(parts)


def chunk_end(ids: list[int], start: int, budget: int, image_token: int, image_len: int) -> int:
    """End of the next prompt chunk from `start`: at most `budget` tokens, never inside an image
    (the engine takes whole images per call); an image longer than the budget goes whole."""
    end = min(len(ids), start + max(budget, 1))
    inside = sum(1 for t in ids[:end] if t == image_token) % image_len
    if inside and end < len(ids) and ids[end] == image_token:
        end = end - inside if end - inside > start else end + image_len - inside
    return end


class Scheduler:
    def __init__(self, engine: Engine, text: TextProcessor, config: SchedulerConfig | None = None):
        self.engine, self.text = engine, text
        self.config = config or SchedulerConfig()
        self.eos_token_ids = set(text.eos_token_ids) | {engine.config.text_config.eos_token_id} - {None}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self.requests: dict[str, Request] = {}
        self.image_cache: OrderedDict[str, Any] = OrderedDict()
        self.block_size = engine.blocks.block_size
        self.num_blocks = engine.blocks.num_blocks
        self.stats = {"steps": 0, "preemptions": 0, "aborted": 0, "images_encoded": 0, "image_cache_hits": 0,
                      "prefix_cached_tokens": 0, "decode_steps_ahead": 0}
        self._queued: tuple[Any, list[Request]] | None = None  # a decode step not read yet, and its rows

    # ------------------------------------------------------------------ requests in and out

    def add(self, request: Request) -> None:
        check_prompt_fits(len(request.prompt_ids), self.engine.max_context)
        if self._blocks(len(request.prompt_ids) + 1) > self.num_blocks:
            raise ValueError(
                f"the prompt is {len(request.prompt_ids)} tokens; the KV cache holds only "
                f"{self.num_blocks * self.block_size}; raise the KV-cache size"
            )
        n_slots = sum(1 for t in request.prompt_ids if t == self.engine.config.image_token_index)
        if n_slots != len(request.images) * self.engine.config.image_seq_length:
            raise ValueError(f"the prompt has {n_slots} image slots for {len(request.images)} images")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.sampler = Sampler(request.params)
        request.detok = StreamingDetokenizer(self.text, answer=True)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks are free when this returns."""
        r = self.requests.get(request_id)
        if r is None:
            return False
        self.stats["aborted"] += 1
        self._finish(r, "abort")
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.engine.num_free_blocks / self.num_blocks

    # ------------------------------------------------------------------ one step

    def step(self) -> None:
        self.stats["steps"] += 1
        self._admit()
        self._decode()
        self._prefill()

    def _blocks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _admit(self) -> None:
        # Blocks the requests still reading their prompt will take, and one block of decode
        # headroom per running request, are spoken for.
        promised = sum(self._blocks(len(r.prompt_ids)) - self._blocks(r.num_computed) for r in self.running if r.in_prompt)
        free = self.engine.num_free_blocks - promised - len(self.running)
        blocks = self.engine.blocks
        caching = hasattr(self.engine, "prefix_keys") and blocks.prefix_caching
        # Prefix caching: a request starts on the cached blocks of its prompt. One whose next block a
        # request still reading its prompt is computing waits for it (a step or two) instead.
        computing = {k for r in self.running if r.in_prompt for k in r.prefix_todo}
        admitted = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            r = self.waiting[0]
            need = self._blocks(len(r.prompt_ids) + 1)
            if need > free and self.running:
                break
            if caching:
                keys = self.engine.prefix_keys(r.prompt_ids, [im.key for im in r.images])
                todo = blocks.uncached(keys, len(r.prompt_ids))
                if todo and todo[0] in computing:
                    break
            self.waiting.popleft()
            r.seq_id, r.num_computed = next(_seq_ids), 0
            if caching:
                r.num_computed, r.prefix_todo = blocks.attach_prefix(r.seq_id, keys, len(r.prompt_ids) - 1), todo
                computing.update(todo)
                self.stats["prefix_cached_tokens"] += r.num_computed
            self.running.append(r)
            admitted.append(r)
            free -= need
        self._encode_images([r for r in admitted if r.images and r.embeds is None])

    def _encode_images(self, requests: list[Request]) -> None:
        """All new images of these requests in one engine call; the rest come from the cache."""
        todo: dict[str, np.ndarray] = {}
        for r in requests:
            for im in r.images:
                if im.key in self.image_cache:
                    self.image_cache.move_to_end(im.key)
                    self.stats["image_cache_hits"] += 1
                elif im.key not in todo:
                    todo[im.key] = im.pixels
        if todo:
            embeds = self.engine.encode_images(np.stack(list(todo.values())))
            self.stats["images_encoded"] += len(todo)
            for i, key in enumerate(todo):
                self.image_cache[key] = embeds[i : i + 1]
        for r in requests:
            r.embeds = _concat([self.image_cache[im.key] for im in r.images])
        while len(self.image_cache) > self.config.image_cache_size:
            self.image_cache.popitem(last=False)

    def _preempt_newest(self, keep: Request | None = None) -> bool:
        victims = [r for r in self.running if r is not keep]
        if not victims:
            return False
        r = victims[-1]
        self.engine.release(r.seq_id)
        self.running.remove(r)
        r.num_computed, r.num_preemptions, r.ahead = 0, r.num_preemptions + 1, False  # a token in flight is dropped
        self.stats["preemptions"] += 1
        self.waiting.appendleft(r)  # first back in
        return True

    def _decode(self) -> None:
        if getattr(self.engine, "overlap_decode", False) and self._decode_ahead():
            return
        self._read_queued()  # a step the plain way needs every request's last token on the host
        while True:
            batch = [r for r in self.running if not r.in_prompt]
            if not batch:
                return
            # The last sampled token, or during a replay after preemption the next generated one.
            tokens = [r.output_ids[r.num_computed - len(r.prompt_ids)] for r in batch]
            greedy = all_greedy([r.sampler for r in batch])
            try:
                out = self.engine.decode([r.seq_id for r in batch], tokens, greedy_only=greedy)
                break
            except CacheFullError:  # the engine undid the step; make room by recompute, then retry
                if len(self.running) == 1:  # alone and still no room: the cache is its context
                    self._finish(batch[0], "length")
                    return
                self._preempt_newest()
        for row, r in enumerate(batch):
            r.num_computed += 1
            if r.num_computed == len(r.prompt_ids) + len(r.output_ids):  # not replaying after preemption
                self._accept(r, next_token(out[row], r.sampler, greedy))

    def _decode_ahead(self) -> bool:
        """Queue this step's decode, then read the one queued last step (its tokens feed this one on
        the device), so the host's work on them overlaps the GPU's. False: run the step the plain way
        (sampling, a replay after preemption, or no room in the cache)."""
        batch = [r for r in self.running if not r.in_prompt]
        if not batch or not all_greedy([r.sampler for r in batch]):
            return False
        if any(not r.ahead and r.num_computed < len(r.prompt_ids) + len(r.output_ids) - 1 for r in batch):
            return False  # replaying tokens after preemption
        if any(not r.ahead for r in batch) and self._queued is not None:  # new arrivals: their tokens are on the host
            self._read_queued()
            batch = [r for r in batch if r.finish_reason is None]
        if (queued := self._queued) is not None:  # every request's next token is in it
            row = {id(r): i for i, r in enumerate(queued[1])}
            # One that stops for length on its queued token needs no further step.
            go = [r for r in batch if len(r.output_ids) + 1 < r.params.max_new_tokens
                  and len(r.prompt_ids) + len(r.output_ids) + 1 < self.engine.max_context]
            feed = (queued[0], [row[id(r)] for r in go])
        else:
            go, feed = batch, [r.output_ids[-1] for r in batch]
        try:
            step = self.engine.decode_async([r.seq_id for r in go], feed) if go else None
        except CacheFullError:  # the engine undid the step; the plain way makes room
            return False
        for r in go:
            r.num_computed += 1
        if queued is not None and go:
            self.stats["decode_steps_ahead"] += 1
        self._read_queued()
        if step is not None:
            self._queued = step, go
            for r in go:
                r.ahead = True
        return True

    def _read_queued(self) -> None:
        """Accept the tokens of the decode step queued last, for the requests still waiting on them."""
        if self._queued is None:
            return
        step, rows = self._queued
        self._queued = None
        out = step.result()
        for i, r in enumerate(rows):
            if r.ahead and r.finish_reason is None:  # else it stopped or was preempted since: a wasted row
                r.ahead = False
                self._accept(r, int(out[i]))

    def _prefill(self) -> None:
        cfg = self.engine.config
        budget = self.config.max_prefill_tokens
        chunks: list[tuple[Request, int, int]] = []
        for r in self.running:
            if not r.in_prompt:
                continue
            if budget <= 0:
                break
            start = r.num_computed
            end = chunk_end(r.prompt_ids, start, budget, cfg.image_token_index, cfg.image_seq_length)
            chunks.append((r, start, end))
            budget -= end - start
        while chunks:
            inputs = []
            for r, start, end in chunks:
                # The images whose tokens this chunk holds; a cached prefix may end inside the first.
                first = sum(1 for t in r.prompt_ids[:start] if t == cfg.image_token_index) // cfg.image_seq_length
                last = -(-sum(1 for t in r.prompt_ids[:end] if t == cfg.image_token_index) // cfg.image_seq_length)
                inputs.append(SequenceInput(r.seq_id, r.prompt_ids[start:end], r.embeds[first:last] if last > first else None,
                                            [im.key for im in r.images[first:last]]))
            try:
                logits = self.engine.prefill(inputs)
                break
            except CacheFullError:
                if len(chunks) > 1:
                    chunks.pop()  # the newest waits a step
                elif not self._preempt_newest(keep=chunks[0][0]):
                    self._finish(chunks[0][0], "error", "the prompt does not fit the free KV cache")
                    return
            except Exception as e:  # a bug or a backend failure: fail these requests, keep serving
                for r, _, _ in chunks:
                    self._finish(r, "error", f"{type(e).__name__}: {e}")
                return
        for row, (r, _, end) in enumerate(chunks):
            r.num_computed = end
            if end == len(r.prompt_ids) and not r.output_ids:  # else a preempted request replays its tokens
                self._accept(r, r.sampler(logits[row]))

    # ------------------------------------------------------------------ tokens out

    def _accept(self, r: Request, token: int) -> None:
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
        p = r.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return self._finish(r, "stop")
        r.output_ids.append(token)
        old = len(r.text)
        r.text += r.detok.add(token)
        if self._cut_at_stop(r, old):
            return self._finish(r, "stop", flush=False)
        if len(r.output_ids) >= p.max_new_tokens or len(r.prompt_ids) + len(r.output_ids) >= self.engine.max_context:
            return self._finish(r, "length")
        self._emit(r)

    def _cut_at_stop(self, r: Request, old: int) -> bool:
        """Cut the text at the first stop string that ends in the text added after `old`."""
        hits = [at for s in r.stop if (at := r.text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            r.text = r.text[: min(hits)]
        return bool(hits)

    def _emit(self, r: Request) -> None:
        if r.finish_reason is None:  # hold back what could be the start of a stop string
            safe = len(r.text) - max((len(s) - 1 for s in r.stop), default=0)
        else:
            safe = len(r.text)
        delta = r.text[r.emitted : max(safe, r.emitted)]
        r.emitted += len(delta)
        if r.on_output is not None:
            now = time.perf_counter()
            r.on_output(RequestOutput(
                r.request_id, delta, r.text, list(r.output_ids), r.finish_reason is not None, r.finish_reason,
                len(r.prompt_ids), r.error,
                None if r.first_token_at is None else r.first_token_at - r.arrival,
                now - r.arrival if r.finish_reason is not None else None,
            ))

    def _finish(self, r: Request, reason: str, error: str | None = None, flush: bool = True) -> None:
        if r.finish_reason is not None:
            return
        if r in self.running:
            if reason in ("stop", "length"):  # the answer's blocks stay cached for the chat's next turn
                self.engine.release(r.seq_id, r.prompt_ids + r.output_ids, [im.key for im in r.images])
            else:
                self.engine.release(r.seq_id)
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        self.requests.pop(r.request_id, None)
        if flush and reason in ("stop", "length"):  # text held back by the detokenizer
            old = len(r.text)
            r.text += r.detok.flush()
            self._cut_at_stop(r, old)
        r.finish_reason, r.error = reason, error
        r.embeds = None
        self._emit(r)
