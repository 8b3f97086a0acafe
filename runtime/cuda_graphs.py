"""CUDA graphs of the torch engine: the decode step, one per batch-size bucket; and the vision
tower, one per number of images.

A decode step of a 7B model is ~1,000 kernel launches; at batch 1 launching them from Python
costs more than the ~5 ms the GPU needs. Each bucket's step is captured once and replayed:
the step's inputs are copied into static buffers (from pinned host memory, asynchronously),
the graph runs, and only the logits come back to the host, which is the step's one sync.

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
        # ids, positions, slots, context lens; and the block tables, staged in pinned memory.
        self.host_vec = host(4, n)
        self.host_tables = host(n, self.width)
        self.vec = torch.zeros(4, n, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, self.width, dtype=torch.int64, device=dev)
        self.zeros = torch.zeros(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _step(self, bs: int) -> torch.Tensor:
        e = self.engine
        ids, positions, slots, lens = (self.vec[i, :bs] for i in range(4))
        kv = PagedKV(e.k_caches, e.v_caches, slots[:, None], self.tables[:bs], lens, rope_tables=e.rope_tables)
        return e.model(ids[:, None], positions=positions[:, None], kv=kv, logits_index=self.zeros[:bs])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._fill([], [], [], [], [])  # all rows dummy: nothing is written to the cache
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its pool
            self.graphs[bs], self.logits[bs] = capture_graph(lambda: self._step(bs), pool)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _fill(self, ids, positions, slots, lens, tables) -> None:
        n = len(ids)
        self.host_vec.zero_()
        self.host_vec[2].fill_(-1)  # dummy rows: no cache write
        self.host_vec[3].fill_(1)  # ... and one (ignored) key
        for i, xs in enumerate((ids, positions, slots, lens)):
            self.host_vec[i, :n] = torch.as_tensor(np.asarray(xs, dtype=np.int64))
        self.host_tables.zero_()
        for row, table in enumerate(tables):
            self.host_tables[row, : len(table)] = torch.as_tensor(table, dtype=torch.int64)
        self.vec.copy_(self.host_vec, non_blocking=True)
        self.tables.copy_(self.host_tables, non_blocking=True)

    @torch.inference_mode()
    def run(self, ids, positions, slots, lens, tables) -> np.ndarray:
        """One decode step for len(ids) sequences (<= the largest bucket): logits [n, vocab] fp32."""
        n = len(ids)
        bs = self.bucket(n)
        self._fill(ids, positions, slots, lens, tables)
        if self.capture:
            self.graphs[bs].replay()
            logits = self.logits[bs]
        else:
            logits = self._step(bs)
        return logits[:n].float().cpu().numpy()


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
