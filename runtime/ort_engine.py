"""The onnxruntime engine: an export directory from llava-export behind the Engine interface.

No torch import anywhere on this path (the fast cold start on a CPU). The decoder graph takes
past keys/values and gives back only the new positions' (export/graphs.py); this engine keeps
each sequence's keys/values in growable numpy buffers and assembles the padded batch each step.
A lone sequence's buffers go to onnxruntime as they are, spare capacity masked out as padding,
so batch-1 decode copies no KV in Python (that copy was a quarter of a `mid` fp32 step).
KV memory is accounted in blocks with the same BlockAllocator as the torch engine, so admission
control above the engine (num_free_blocks, CacheFullError) works the same on both backends.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from llava_rt.config import LlavaConfig

from .engine import SequenceInput
from .kv_cache import BlockAllocator, CacheFullError
from .manifest import ArtifactError, find_export, read_manifest, rebuild_hint

ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


class _SeqCache:
    """One sequence's keys and values: per layer [1, kv_heads, capacity, head_dim].

    Capacity grows in CHUNK steps, not doubling: the spare capacity is attended over (masked)
    at batch 1, so it is kept small; a regrow copy every CHUNK tokens is cheap.
    """

    CHUNK = 64

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: np.dtype):
        self.length = 0
        self.k = [np.zeros((1, kv_heads, 0, head_dim), dtype) for _ in range(layers)]
        self.v = [np.zeros((1, kv_heads, 0, head_dim), dtype) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def append(self, new_k: list[np.ndarray], new_v: list[np.ndarray], row: int, n: int) -> None:
        end = self.length + n
        if end > self.capacity:
            cap = -(-end // self.CHUNK) * self.CHUNK + self.CHUNK

            def grow(a: np.ndarray) -> np.ndarray:
                out = np.zeros(a.shape[:2] + (cap,) + a.shape[3:], a.dtype)
                out[:, :, : self.length] = a[:, :, : self.length]
                return out

            self.k, self.v = [grow(a) for a in self.k], [grow(a) for a in self.v]
        for layer in range(len(self.k)):
            self.k[layer][0, :, self.length : end] = new_k[layer][row, :, :n]
            self.v[layer][0, :, self.length : end] = new_v[layer][row, :, :n]
        self.length = end


class OrtEngine:
    backend = "onnxruntime"

    def __init__(
        self,
        export_dir: str | Path,
        source_dir: str | Path | None = None,
        device: str = "cpu",
        block_size: int = 16,
        kv_cache_bytes: int = 1 << 30,
        max_num_seqs: int = 64,
    ):
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir, source_dir)
        self.config = LlavaConfig.load(self.export_dir)
        text = self.config.text_config
        self.max_context = text.max_position_embeddings
        self.providers = self._providers(device)
        self.dtype = np.dtype(self.manifest["graphs"]["decoder"]["inputs"][0]["dtype"])
        self.decoder = self._session("decoder")
        self._vision = None  # opened on the first image: text-only use never pays for it
        self.embed_tokens = np.load(self.export_dir / self.manifest["embeddings"]["file"], mmap_mode="r")
        self.layers, self.kv_heads, self.head_dim = text.num_hidden_layers, text.num_key_value_heads, text.head_dim
        bytes_per_block = 2 * self.layers * block_size * self.kv_heads * self.head_dim * self.dtype.itemsize
        useful = max_num_seqs * -(-self.max_context // block_size)
        self.blocks = BlockAllocator(max(1, min(useful, kv_cache_bytes // bytes_per_block)), block_size)
        self.caches: dict[int, _SeqCache] = {}

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", dtype: str = "float32", **kwargs) -> "OrtEngine":
        """model_dir: an export directory, or a checkpoint with its export in MODEL_DIR/onnx."""
        model_dir = Path(model_dir)
        export_dir = find_export(model_dir)
        if export_dir is None:
            raise ArtifactError(
                f"{model_dir} has no ONNX export (no manifest.json there or in {model_dir / 'onnx'}); "
                f"make one: llava-export {model_dir}"
            )
        engine = cls(export_dir, source_dir=None if export_dir == model_dir else model_dir, device=device, **kwargs)
        if dtype not in ("float32", str(engine.dtype)):
            raise ArtifactError(
                f"--dtype {dtype} asked for, but {export_dir} holds {engine.dtype} graphs; "
                f"export that dtype: llava-export {model_dir} --dtype fp16 --out DIR"
            )
        return engine

    @staticmethod
    def _providers(device: str) -> list[str]:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("--device cuda with --backend onnxruntime needs onnxruntime-gpu; use --device cpu")
            device_id = int(device.partition(":")[2] or 0)
            return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        raise ValueError(f"unknown device {device!r}; use cpu or cuda[:N]")

    def _session(self, name: str) -> ort.InferenceSession:
        graph = self.manifest["graphs"][name]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(self.export_dir / graph["files"][0]), options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot open {name} graph ({e}); {rebuild_hint(self.manifest, self.export_dir)}") from None
        for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
            want = [(s["name"], ORT_TYPES[s["dtype"]]) for s in graph[kind]]
            if [(a.name, a.type) for a in actual] != want:
                raise ArtifactError(
                    f"{graph['files'][0]}: {kind} {[(a.name, a.type) for a in actual]} do not match the manifest's "
                    f"{want}; {rebuild_hint(self.manifest, self.export_dir)}"
                )
        return session

    # ------------------------------------------------------------------ Engine interface

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def seq_len(self, seq_id: int) -> int:
        return self.blocks.length(seq_id)

    def release(self, seq_id: int, token_ids: list[int] | None = None, image_keys: list[str] | None = None) -> None:
        """Free the sequence's cache (this engine caches no prefixes, so the ids are not needed)."""
        self.blocks.release(seq_id)
        self.caches.pop(seq_id, None)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if self._vision is None:
            self._vision = self._session("vision")
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return self._vision.run(None, {"pixel_values": pixels})[0]

    def prefill(self, sequences: list[SequenceInput]) -> np.ndarray:
        per_image = self.config.image_seq_length
        for s in sequences:
            slots = sum(1 for t in s.token_ids if t == self.config.image_token_index)
            images = 0 if s.image_embeds is None else len(s.image_embeds)
            if slots != images * per_image:
                raise ValueError(f"sequence {s.seq_id}: {slots} image-token slots but {images} images ({per_image} slots each)")
        return self._step([s.seq_id for s in sequences], [s.token_ids for s in sequences], [s.image_embeds for s in sequences])

    def decode(self, seq_ids: list[int], tokens: list[int], greedy_only: bool = False) -> np.ndarray:
        logits = self._step(seq_ids, [[t] for t in tokens], [None] * len(seq_ids))
        return logits.argmax(-1) if greedy_only else logits

    # ------------------------------------------------------------------ one decoder call

    def _step(self, seq_ids: list[int], token_lists: list[list[int]], images: list) -> np.ndarray:
        new = dict(zip(seq_ids, map(len, token_lists)))
        if len(new) != len(seq_ids) or 0 in new.values():
            raise ValueError("each sequence must appear once with at least one token")
        for s, n in new.items():
            if self.seq_len(s) + n > self.max_context:
                raise ValueError(f"sequence {s} would reach {self.seq_len(s) + n} tokens, over the model's context of {self.max_context}")
        if not self.blocks.can_append(new):
            raise CacheFullError(f"KV cache full: {len(seq_ids)} sequences need more blocks than the {self.num_free_blocks} free")
        feed = self._inputs(seq_ids, token_lists, images)
        outputs = self.decoder.run(None, feed)
        new_k, new_v = outputs[1::2], outputs[2::2]
        for row, (s, toks) in enumerate(zip(seq_ids, token_lists)):
            if s not in self.caches:
                self.caches[s] = _SeqCache(self.layers, self.kv_heads, self.head_dim, self.dtype)
            self.caches[s].append(new_k, new_v, row, len(toks))
            self.blocks.append(s, len(toks))
        return outputs[0].astype(np.float32, copy=False)

    def _inputs(self, seq_ids, token_lists, images) -> dict:
        b, t = len(seq_ids), max(map(len, token_lists))
        past_lens = [self.seq_len(s) for s in seq_ids]
        alone = b == 1 and seq_ids[0] in self.caches
        p = self.caches[seq_ids[0]].capacity if alone else max(past_lens)
        ids = np.zeros((b, t), np.int64)
        positions = np.zeros((b, t), np.int64)
        mask = np.zeros((b, p + t), np.int64)
        for row, (toks, past) in enumerate(zip(token_lists, past_lens)):
            ids[row, : len(toks)] = toks
            positions[row, : len(toks)] = np.arange(past, past + len(toks))
            mask[row, :past] = 1
            mask[row, p : p + len(toks)] = 1
        # Only rows given images have image slots: a decode step may sample the image token id, and
        # then it is embedded as a plain token (as the torch model and transformers do).
        has_images = np.array([im is not None and len(im) > 0 for im in images])[:, None]
        is_image = (ids == self.config.image_token_index) & has_images
        # The image token id may lie outside the table; its rows are replaced below anyway.
        embeds = np.asarray(self.embed_tokens[np.where(is_image, 0, ids)], dtype=self.dtype)
        for row, image_embeds in enumerate(images):
            if image_embeds is not None and len(image_embeds):
                embeds[row, is_image[row]] = np.asarray(image_embeds, self.dtype).reshape(-1, embeds.shape[-1])
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": positions,
            "logits_index": np.array([len(x) - 1 for x in token_lists], np.int64),
        }
        for layer in range(self.layers):
            for kind in ("key", "value"):
                if alone:  # the whole buffer, no copy; the mask hides the spare capacity
                    feed[f"past_{kind}.{layer}"] = getattr(self.caches[seq_ids[0]], kind[0])[layer]
                else:
                    feed[f"past_{kind}.{layer}"] = self._gather_past(seq_ids, past_lens, p, layer, kind)
        return feed

    def _gather_past(self, seq_ids, past_lens, p: int, layer: int, kind: str) -> np.ndarray:
        out = np.zeros((len(seq_ids), self.kv_heads, p, self.head_dim), self.dtype)
        for row, (s, n) in enumerate(zip(seq_ids, past_lens)):
            if n:
                out[row, :, :n] = getattr(self.caches[s], kind[0])[layer][0, :, :n]
        return out
