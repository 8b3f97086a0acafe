"""The engine interface: three calls over a KV cache the engine owns.

    encode_images(pixels)        -> image embeddings (an opaque handle the same engine takes back)
    prefill(sequences)           -> logits [B, vocab] at each sequence's last new token
    decode(seq_ids, tokens)      -> logits [B, vocab] for one new token per sequence; with
                                    greedy_only=True the argmax tokens [B] instead (on a GPU only
                                    the token ids then cross to the host)
    release(seq_id, ids, keys)   -> frees the sequence's KV blocks; given its ids (prompt and
                                    output) and image keys, an engine that caches prefixes keeps
                                    its full blocks cached first (a chat's next turn repeats them)
    prefix_keys(ids, image_keys) -> the prompt's prefix-cache keys, for blocks.attach_prefix
                                    (optional: the torch engine's prefix caching, kv_cache.py)

Scheduling, sampling, detokenization, the CLI and the server sit above this and never learn
which backend runs. Logits come back as numpy float32 so every backend shares the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from llava_rt.config import LlavaConfig


@dataclass
class SequenceInput:
    seq_id: int
    token_ids: list[int]  # new tokens; <image> already expanded to image_seq_length slots
    image_embeds: Any = None  # from encode_images: one entry per <image> in token_ids, in order
    # The images' content keys (kv_cache.image_key), for prefix caching: None = unknown, so a prompt
    # with images is computed whole. A call that starts inside an image (its first rows already
    # cached) passes that whole image; the rows already in the cache are skipped.
    image_keys: list[str] | None = None


class Engine(Protocol):
    config: LlavaConfig
    backend: str
    max_context: int

    def encode_images(self, pixel_values: np.ndarray) -> Any: ...

    def prefill(self, sequences: list[SequenceInput]) -> np.ndarray: ...

    def decode(self, seq_ids: list[int], tokens: list[int], greedy_only: bool = False) -> np.ndarray: ...

    def release(self, seq_id: int, token_ids: list[int] | None = None, image_keys: list[str] | None = None) -> None: ...

    def seq_len(self, seq_id: int) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...


BACKENDS = ("torch", "onnxruntime")


def load_engine(model_dir, backend: str = "torch", device: str = "cpu", dtype: str = "float32", **kwargs) -> Engine:
    """Open a model directory with the named backend."""
    if backend == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine.load(model_dir, device=device, dtype=dtype, **kwargs)
    if backend == "onnxruntime":  # an export directory, or MODEL_DIR with its export in MODEL_DIR/onnx
        from .ort_engine import OrtEngine

        return OrtEngine.load(model_dir, device=device, dtype=dtype, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
