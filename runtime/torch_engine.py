"""The torch engine: our model with a paged KV cache, batched prefill and decode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from llava_rt.checkpoint import load_model
from llava_rt.model import LlavaForConditionalGeneration, PagedKV, VisionFeatures, fuse_projections

from .engine import SequenceInput
from .kv_cache import BlockAllocator, CacheFullError, prefix_block_keys

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return DTYPES[name]


class OneDNNLinear(torch.nn.Module):
    """An inference-only nn.Linear whose weight is prepacked for oneDNN (CPU, fp32). MKL's sgemm,
    which plain nn.Linear uses, took 2-2.5x longer for the decode and prefill shapes on the
    project's AMD EPYC machine (0.44 vs 0.18 ms for 16 x 768 -> 2048)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.packed = linear.weight.detach().to_mkldnn()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def use_onednn_linears(model: torch.nn.Module, min_weights: int = 768 * 768) -> None:
    """Swap each nn.Linear of an inference model with at least min_weights weights for a
    OneDNNLinear, in place. A oneDNN call costs ~15 us more than MKL's; it pays from about
    768 x 768 (equal at one token, 1.9x faster at 16), so small models keep plain nn.Linear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.numel() >= min_weights:
                setattr(parent, name, OneDNNLinear(child))


class DeviceTokens:
    """The greedy tokens of a decode step that may still be running: on the device, where the next
    step can read them (decode_async), and on their way to pinned host memory; result() waits for
    them, the step's one sync."""

    def __init__(self, tokens: torch.Tensor, host: torch.Tensor | None = None, ready=None):
        """tokens: on the device; host, ready: their staged copy and its event (DecodeGraphs.run),
        or None to copy them back here."""
        if tokens.is_cuda and host is None:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.tokens, self._host, self._ready = tokens, tokens if host is None else host, ready

    @classmethod
    def of(cls, out) -> "DeviceTokens":
        """From a greedy _forward: the decode graphs' (tokens, host copy, event), or eager tokens."""
        return cls(*out) if isinstance(out, tuple) else cls(out)

    def result(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.numpy().copy()


def _last_rows(embeds, n: int):
    """The last n image-feature rows of these images as one [1, n, dim] batch (VisionFeatures kept)."""
    if isinstance(embeds, VisionFeatures):
        return VisionFeatures(_last_rows(embeds.features, n), embeds.use_kernels)
    return embeds.reshape(1, -1, embeds.shape[-1])[:, -n:]


class TorchEngine:
    backend = "torch"

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        block_size: int = 16,
        kv_cache_bytes: int = 1 << 30,
        max_num_seqs: int = 64,
        use_kernels: bool | None = None,
        static_decode: bool | None = None,
        prefix_caching: bool = True,
    ):
        self.model = model.eval()
        self.config = model.config
        text = self.config.text_config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_context = text.max_position_embeddings
        bytes_per_block = 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim * param.element_size()
        # No more blocks than max_num_seqs full-length sequences could use.
        useful = max_num_seqs * -(-self.max_context // block_size)
        num_blocks = max(1, min(useful, kv_cache_bytes // bytes_per_block))
        shape = (num_blocks, block_size, text.num_key_value_heads, text.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(text.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(text.num_hidden_layers)]
        self.blocks = BlockAllocator(num_blocks, block_size, prefix_caching)
        # generate() queues each greedy decode step before reading the last one's tokens
        # (decode_async), so the host's bookkeeping runs while the GPU works. On the CPU the ops are
        # synchronous anyway, and a step queued for a sequence that then stops would be wasted.
        self.overlap_decode = self.device.type == "cuda"
        # The Triton kernels (llava_rt.kernels) run on CUDA where Triton is installed; None = that.
        # True on the CPU works only under TRITON_INTERPRET=1 (tests).
        if use_kernels is None:
            use_kernels = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.use_kernels = use_kernels
        self.rope_tables = None
        if use_kernels:
            from llava_rt.kernels.rope_kv import rope_tables

            self.rope_tables = rope_tables(self.max_context, text.head_dim, text.rope_theta, self.device)
            fuse_projections(self.model)
        # Decode through static buffers at batch-size buckets, replayed as CUDA graphs on CUDA
        # (None = on CUDA with the kernels). True on the CPU runs the same buffers eagerly (tests).
        self.max_num_seqs = max_num_seqs
        if static_decode is None:
            static_decode = use_kernels and self.device.type == "cuda"
        self.graphs = self.prefill_graphs = None
        if static_decode:
            from .cuda_graphs import DecodeGraphs, PrefillGraphs

            self.graphs = DecodeGraphs(self, capture=self.device.type == "cuda")
            # Whole prompts of one sequence too (the batching scheduler's usual prefill); captured
            # per length bucket on first use.
            self.prefill_graphs = PrefillGraphs(self, capture=self.graphs.capture)
        # The vision tower as CUDA graphs too, wherever the decode step is one; one image's is
        # captured now, so a server's first request does not pay for it.
        self.encode_graphs = None
        if self.graphs is not None and self.graphs.capture:
            from .cuda_graphs import EncodeGraphs

            vc = self.config.vision_config
            self.encode_graphs = EncodeGraphs(self.model.vision_features if use_kernels else self.model.encode_images)
            self.encode_graphs(torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, dtype=self.dtype,
                                           device=self.device))

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", dtype: str = "float32", onednn: bool | None = None,
             **kwargs) -> "TorchEngine":
        """onednn: fp32 CPU linears through oneDNN (OneDNNLinear); None = on where it applies (not with
        the Triton kernels, which read the weights themselves)."""
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        model = load_model(model_dir, device=device, dtype=parse_dtype(dtype))
        if onednn is None:
            onednn = (device == "cpu" and dtype in ("float32", "fp32") and not kwargs.get("use_kernels")
                      and torch.backends.mkldnn.is_available())
        if onednn:  # the engine owns this model, so swapping its layers in place is safe
            use_onednn_linears(model)
        return cls(model, **kwargs)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def seq_len(self, seq_id: int) -> int:
        return self.blocks.length(seq_id)

    def release(self, seq_id: int, token_ids: list[int] | None = None, image_keys: list[str] | None = None) -> None:
        """Free the sequence's blocks. Given its ids (prompt and output) and its images' keys, its full
        blocks, the answer's too, stay cached first: a chat's next turn repeats them."""
        if token_ids is not None and self.blocks.prefix_caching and self.blocks.started(seq_id):
            ids = token_ids[: self.blocks.length(seq_id)]  # those in the cache (the last sampled token is not)
            if image_keys is not None or self.config.image_token_index not in ids:
                self.blocks.cache_blocks(seq_id, self.prefix_keys(ids, image_keys or []))
        self.blocks.release(seq_id)

    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, self.dtype)
        if self.encode_graphs is not None:
            out = self.encode_graphs(pixels)
            return VisionFeatures(out) if self.use_kernels else out
        if self.use_kernels:  # projected later, straight into the prompt's image-token rows
            return VisionFeatures(self.model.vision_features(pixels))
        return self.model.encode_images(pixels)

    def reset_prefix_cache(self) -> None:
        self.blocks.reset_prefix_cache()

    def prefix_keys(self, token_ids: list[int], image_keys: list[str]) -> list[bytes]:
        """The prefix-cache keys of a prompt's whole blocks (kv_cache.prefix_block_keys)."""
        cfg = self.config
        return prefix_block_keys(token_ids, image_keys, cfg.image_token_index, cfg.image_seq_length,
                                 self.blocks.block_size)

    def prefill(self, sequences: list[SequenceInput]) -> np.ndarray:
        cfg = self.config
        for s in sequences:
            n_slots = sum(1 for t in s.token_ids if t == cfg.image_token_index)
            n_rows = (0 if s.image_embeds is None else len(s.image_embeds)) * cfg.image_seq_length
            # A call that starts inside an image (its first rows cached) passes that image whole.
            surplus_ok = self.blocks.length(s.seq_id) > 0 and 0 <= n_rows - n_slots < cfg.image_seq_length
            if n_slots != n_rows and not surplus_ok:
                raise ValueError(
                    f"sequence {s.seq_id}: {n_slots} image-token slots but {n_rows // cfg.image_seq_length} "
                    f"images ({cfg.image_seq_length} slots each)"
                )
            if s.image_keys is not None and len(s.image_keys) * cfg.image_seq_length != n_rows:
                raise ValueError(f"sequence {s.seq_id}: {len(s.image_keys)} image keys for {n_rows // cfg.image_seq_length} images")
        # New sequences whose images are known by content start on the cached blocks of their prompt.
        # One whose next block another sequence of this call computes waits for it, in a second pass.
        first, second, computing, skip = [], [], set(), {}
        for s in sequences:
            n_images = 0 if s.image_embeds is None else len(s.image_embeds)
            if not self.blocks.prefix_caching or self.blocks.started(s.seq_id) or (n_images and s.image_keys is None):
                first.append(s)
                continue
            keys = self.prefix_keys(s.token_ids, s.image_keys or [])
            todo = self.blocks.uncached(keys, len(s.token_ids))
            if todo and todo[0] in computing:
                second.append((s, keys))
                continue
            computing.update(todo)
            skip[s.seq_id] = self.blocks.attach_prefix(s.seq_id, keys, len(s.token_ids) - 1)
            first.append(s)
        logits = {}
        try:
            if first:
                logits.update(self._prefill_pass(first, skip))
            if second:  # on the blocks the first pass cached
                for s, keys in second:
                    skip[s.seq_id] = self.blocks.attach_prefix(s.seq_id, keys, len(s.token_ids) - 1)
                logits.update(self._prefill_pass([s for s, _ in second], skip))
        except BaseException:
            for seq_id in skip:  # a failed call leaves the sequences it started unstarted
                self.blocks.release(seq_id)
            raise
        return np.stack([logits[s.seq_id] for s in sequences])

    def _prefill_pass(self, sequences: list[SequenceInput], skip: dict[int, int]) -> dict[int, np.ndarray]:
        """One forward over each sequence's tokens past the `skip` it found cached, with the image
        rows those take (the last rows of its images); then its full prompt blocks are cached."""
        image_token = self.config.image_token_index
        token_lists, rows = [], []
        for s in sequences:
            ids = s.token_ids[skip.get(s.seq_id, 0):]
            token_lists.append(ids)
            if n := sum(1 for t in ids if t == image_token):
                rows.append(_last_rows(s.image_embeds, n))
        image_features = None
        if rows and isinstance(rows[0], VisionFeatures):
            image_features = VisionFeatures(torch.cat([r.features for r in rows], dim=1), rows[0].use_kernels)
        elif rows:
            image_features = torch.cat(rows, dim=1)
        logits = self._forward([s.seq_id for s in sequences], token_lists, image_features).float().cpu().numpy()
        for s in sequences:
            self.blocks.commit(s.seq_id)
        return {s.seq_id: row for s, row in zip(sequences, logits)}

    def decode(self, seq_ids: list[int], tokens: list[int], greedy_only: bool = False) -> np.ndarray:
        out = self._forward(seq_ids, [[t] for t in tokens], None, greedy_only)
        if greedy_only:  # only the tokens cross to the host
            return DeviceTokens.of(out).result()
        return out.float().cpu().numpy()

    def decode_async(self, seq_ids: list[int], tokens: list[int] | tuple[DeviceTokens, list[int]]) -> DeviceTokens:
        """decode(seq_ids, tokens, greedy_only=True) without waiting for the step: it is queued on the
        GPU and its tokens come back as DeviceTokens. `tokens` may be (an earlier step's DeviceTokens,
        the row of it that feeds each sequence), so a step can be queued before the host has seen the
        tokens it reads."""
        feed = None
        if isinstance(tokens, tuple):
            prev, rows = tokens
            if len(rows) != len(seq_ids) or any(not 0 <= r < len(prev.tokens) for r in rows):
                raise ValueError(f"rows {rows} do not pick one token of the earlier step per sequence")
            feed, tokens = (prev.tokens, list(rows)), [0] * len(seq_ids)
        return DeviceTokens.of(self._forward(seq_ids, [[t] for t in tokens], None, True, feed))

    @torch.inference_mode()
    def _forward(self, seq_ids: list[int], token_lists: list[list[int]], image_features,
                 greedy_only: bool = False, feed=None):
        """Logits [B, vocab] at each sequence's last new token, or with greedy_only their argmax [B],
        on the device (from the decode graphs: DecodeGraphs.run's tokens, host copy and event).
        feed: (device tokens, rows) that replace the one-token lists' ids."""
        new = {s: len(t) for s, t in zip(seq_ids, token_lists)}
        if len(new) != len(seq_ids) or any(n == 0 for n in new.values()):
            raise ValueError("each sequence must appear once with at least one token")
        for s, n in new.items():
            if self.blocks.length(s) + n > self.max_context:
                raise ValueError(
                    f"sequence {s} would reach {self.blocks.length(s) + n} tokens, over the model's "
                    f"context of {self.max_context}"
                )
        if not self.blocks.can_append(new):
            raise CacheFullError(
                f"KV cache full: {len(seq_ids)} sequences need more blocks than the {self.blocks.num_free_blocks} free"
            )
        before = {s: self.blocks.length(s) for s in seq_ids}
        try:
            return self._run(seq_ids, token_lists, image_features, max(new.values()), greedy_only, feed)
        except BaseException:
            for s, n in before.items():  # undo this step's reservations so a failed call loses nothing
                if s in self.blocks.lengths:
                    self.blocks.truncate(s, n)
            raise

    def _run(self, seq_ids, token_lists, image_features, t, greedy_only, feed):
        b = len(seq_ids)
        pad = self.config.text_config.pad_token_id or 0
        ids = np.full((b, t), pad, dtype=np.int64)
        positions = np.zeros((b, t), dtype=np.int64)
        slots = np.full((b, t), -1, dtype=np.int64)
        for row, (s, toks) in enumerate(zip(seq_ids, token_lists)):
            start = self.blocks.length(s)
            ids[row, : len(toks)] = toks
            positions[row, : len(toks)] = np.arange(start, start + len(toks))
            slots[row, : len(toks)] = self.blocks.append(s, len(toks))
        tables = [self.blocks.tables[s] for s in seq_ids]
        lens = np.array([self.blocks.length(s) for s in seq_ids], dtype=np.int64)
        if t == 1 and self.graphs is not None and self.graphs.bucket(b) is not None:
            return self.graphs.run(ids[:, 0], positions[:, 0], slots[:, 0], lens, tables, greedy_only, feed)
        as_tensor = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        ids = as_tensor(ids)
        if feed is not None:
            ids[:, 0] = feed[0][as_tensor(np.array(feed[1], dtype=np.int64))]
        prefix_free = bool((positions[:, 0] == 0).all())
        if b == 1 and prefix_free and self.prefill_graphs is not None and self.prefill_graphs.bucket(t) is not None:
            embeds = self.model.embed(ids, image_features)
            return self.prefill_graphs.run(embeds, positions[0], slots[0])
        width = max(len(tb) for tb in tables)
        block_tables = np.array([tb + [0] * (width - len(tb)) for tb in tables], dtype=np.int64)
        kv = PagedKV(self.k_caches, self.v_caches, as_tensor(slots), as_tensor(block_tables), as_tensor(lens),
                     rope_tables=self.rope_tables, prefix_free=prefix_free)
        last = as_tensor(np.array([len(x) - 1 for x in token_lists], dtype=np.int64))
        logits = self.model(ids, positions=as_tensor(positions), kv=kv, image_features=image_features, logits_index=last)
        return logits.argmax(-1) if greedy_only else logits
