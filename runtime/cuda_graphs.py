"""CUDA graphs of the torch engine: the decode step, one per batch-size bucket; a whole prompt's
prefill, one per length bucket; and the vision tower, one per number of images.

A decode step of a 7B model is ~1,000 kernel launches; at batch 1 launching them from Python
costs more than the ~5 ms the GPU needs. Each bucket's step is captured once and replayed:
the step's inputs are copied into static buffers (from pinned host memory, asynchronously),
the graph runs, and only the logits (or, for greedy batches, the argmax tokens the graph also
computes) come back to the host, which is the step's one sync. The token ids may instead come
from an earlier step's output on the device (TorchEngine.decode_async), so a step can be queued
before the host has read the last one's tokens.

Batches are padded up to the next bucket with dummy rows: slot -1 (nothing is written to the
cache), context length 1, block 0 (read but ignored). The block table is as wide as the
model's context, so the attention kernels' launch shapes (split-K included) never change.

`capture=False` runs the same static-buffer code eagerly (no CUDA graph), so the buffer and
padding logic is tested on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import numpy as np
import torch

from llava_rt.model import PagedKV

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
STAGING_SLOTS = 3  # decode steps in flight at most: one running, one queued behind it, one being filled


@torch.inference_mode()
def capture_graph(fn, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn() captured as a CUDA graph in `pool`, on a side stream after two warm-up calls (Triton
    compiles and autotunes, libraries make their handles, outside the capture): (graph, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph, out


class DecodeGraphs:
    def __init__(self, engine, buckets=DEFAULT_BUCKETS, capture: bool = True):
        self.engine, self.capture = engine, capture
        self.buckets = sorted(b for b in buckets if b <= engine.max_num_seqs) or [1]
        n, dev = self.buckets[-1], engine.device
        self.width = -(-engine.max_context // engine.blocks.block_size)
        pin = dev.type == "cuda"
        host = lambda *shape: torch.zeros(*shape, dtype=torch.int64, pin_memory=pin)  # noqa: E731
        # Pinned staging for a step's inputs and its greedy tokens, in slots taken in turn: with a step
        # queued ahead (TorchEngine.decode_async) the last step's copies may still be pending, so a
        # slot is refilled only after the event recorded behind its last step (passed long before).
        self.staging = [(host(5, n), host(n, self.width), host(n)) for _ in range(STAGING_SLOTS)]
        self.staged: list[torch.cuda.Event | None] = [None] * STAGING_SLOTS
        self.slot = 0
        # ids, positions, slots, context lens, and the rows of an earlier step's tokens that feed the ids
        self.vec = torch.zeros(5, n, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, self.width, dtype=torch.int64, device=dev)
        self.zeros = torch.zeros(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (logits, argmax tokens)
        if capture:
            self._capture_all()

    def _step(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.engine
        ids, positions, slots, lens = (self.vec[i, :bs] for i in range(4))
        kv = PagedKV(e.k_caches, e.v_caches, slots[:, None], self.tables[:bs], lens, rope_tables=e.rope_tables)
        logits = e.model(ids[:, None], positions=positions[:, None], kv=kv, logits_index=self.zeros[:bs])
        return logits, logits.argmax(-1)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._fill([], [], [], [], [])  # all rows dummy: nothing is written to the cache
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
            self.graphs[bs], self.outputs[bs] = capture_graph(lambda: self._step(bs), pool)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _fill(self, ids, positions, slots, lens, tables, feed=None) -> None:
        n = len(ids)
        host_vec, host_tables, _ = self.staging[self.slot]
        vec, tab = host_vec.numpy(), host_tables.numpy()  # numpy views: no tensor per row
        vec[:, n:] = np.array([0, 0, -1, 1, 0])[:, None]  # dummy rows: no cache write, one (ignored) key
        for i, xs in enumerate((ids, positions, slots, lens, [] if feed is None else feed[1])):
            vec[i, : len(xs)] = xs
        tab.fill(0)
        for row, table in enumerate(tables):
            tab[row, : len(table)] = table
        self.vec.copy_(host_vec, non_blocking=True)
        self.tables.copy_(host_tables, non_blocking=True)
        if feed is not None:  # the ids are an earlier step's tokens, still on the device
            self.vec[0, :n] = feed[0].index_select(0, self.vec[4, :n])

    @torch.inference_mode()
    def run(self, ids, positions, slots, lens, tables, greedy_only: bool = False, feed=None):
        """One decode step for len(ids) sequences (<= the largest bucket), queued. Returns logits
        [n, vocab] on the device, valid until the next step; or with greedy_only (tokens [n] on the
        device, their copy on its way to pinned memory, the event after which it has arrived): 4 MB
        fewer to copy back than the logits at batch 32. feed: (an earlier step's tokens on the
        device, the row of them each sequence reads) in place of `ids`."""
        n = len(ids)
        bs = self.bucket(n)
        if self.staged[self.slot] is not None:
            self.staged[self.slot].synchronize()
        self._fill(ids, positions, slots, lens, tables, feed)
        if self.capture:
            self.graphs[bs].replay()
            logits, tokens = self.outputs[bs]
        else:
            logits, tokens = self._step(bs)
        if greedy_only:
            tokens = tokens[:n].clone()  # the graph's output buffer is overwritten by its next replay
            host_tokens = self.staging[self.slot][2][:n]
            host_tokens.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event() if self.vec.is_cuda else None
        if done is not None:
            done.record()
        self.staged[self.slot], self.slot = done, (self.slot + 1) % STAGING_SLOTS
        return (tokens, host_tokens, done) if greedy_only else logits[:n]


class PrefillGraphs:
    """The prefill of one whole prompt (nothing cached before it) as a CUDA graph per length
    bucket, a multiple of `step` tokens up to max_tokens, captured on a bucket's first use. Eager,
    the 7B prefill of 617 tokens is ~380 launches, and how long Python takes to launch them depends
    on the host: on two H200 machines 14.1 and 17.9 ms op by op, 13.9 and 14.7 ms as a graph, for
    12.7 ms of kernels (benchmarks/results/profile-h200-2026-11-30*.json).

    The graph starts at the embeddings: the engine embeds the prompt and projects the image features
    into it eagerly (a few launches, and the image rows are found with a host sync), and the result
    is copied into a static buffer. Padding rows sit after the prompt, where causal attention never
    reaches them; they are zeros, write nothing to the cache (slot -1) and take position 0.
    """

    def __init__(self, engine, step: int = 64, max_tokens: int = 2048, capture: bool = True):
        self.engine, self.step, self.capture = engine, step, capture
        self.max_tokens = min(max_tokens, engine.max_context) // step * step
        n, dev = self.max_tokens, engine.device
        self.embeds = torch.zeros(1, n, engine.config.text_config.hidden_size, dtype=engine.dtype, device=dev)
        # positions, slots, and the index of the last real row (in column 0 of row 2)
        self.host = torch.zeros(3, n, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.vec = torch.zeros(3, n, dtype=torch.int64, device=dev)
        self.unused = torch.zeros(1, 1, dtype=torch.int64, device=dev)  # block table and lengths: not read
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, n: int) -> int | None:
        return -(-n // self.step) * self.step if 1 < n <= self.max_tokens else None

    def _step(self, t: int) -> torch.Tensor:
        e = self.engine
        positions, slots = self.vec[0, :t][None], self.vec[1, :t][None]
        kv = PagedKV(e.k_caches, e.v_caches, slots, self.unused, self.unused[0], rope_tables=e.rope_tables,
                     prefix_free=True)
        return e.model(None, positions=positions, kv=kv, inputs_embeds=self.embeds[:, :t], logits_index=self.vec[2, :1])

    def _fill(self, embeds: torch.Tensor | None, positions, slots) -> None:
        n = 0 if embeds is None else embeds.shape[1]
        self.host.zero_()
        self.host[1].fill_(-1)
        self.host[0, :n] = torch.as_tensor(positions)
        self.host[1, :n] = torch.as_tensor(slots)
        self.host[2, 0] = max(n - 1, 0)
        self.vec.copy_(self.host, non_blocking=True)
        self.embeds.zero_()
        if embeds is not None:
            self.embeds[:, :n].copy_(embeds)

    @torch.inference_mode()
    def run(self, embeds: torch.Tensor, positions: np.ndarray, slots: np.ndarray) -> torch.Tensor:
        """embeds [1, n, hidden] of a whole prompt (n within max_tokens): logits [1, vocab], on the device."""
        t = self.bucket(embeds.shape[1])
        if self.capture and t not in self.graphs:
            self._fill(None, [], [])  # all rows padding while warming up and capturing: no cache writes
            self.graphs[t] = capture_graph(lambda: self._step(t), self.pool)
        self._fill(embeds, positions, slots)
        if self.capture:
            graph, logits = self.graphs[t]
            graph.replay()
        else:
            logits = self._step(t)
        return logits


class EncodeGraphs:
    """The vision tower as a CUDA graph per input shape (number of images), captured on first use
    for up to max_images images; more run eagerly. CLIP ViT-L/336 is ~360 small kernels: eager,
    an H200 waited 12 ms on Python for 2 ms of GPU work. Each call's output is a fresh tensor
    (the engine caches encodings, and the next replay overwrites the graph's own output)."""

    def __init__(self, fn, max_images: int = 8):
        self.fn, self.max_images = fn, max_images
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _capture(self, pixels: torch.Tensor) -> None:
        static_in = pixels.clone()
        graph, static_out = capture_graph(lambda: self.fn(static_in), self.pool)
        self.graphs[tuple(pixels.shape)] = (graph, static_in, static_out)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] > self.max_images:
            return self.fn(pixels)
        if tuple(pixels.shape) not in self.graphs:
            self._capture(pixels)
        graph, static_in, static_out = self.graphs[tuple(pixels.shape)]
        static_in.copy_(pixels)
        graph.replay()
        return static_out.clone()
