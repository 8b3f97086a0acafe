"""Image + question in, answer out: processor, engine, sampler and detokenizer wired together.

Backend-neutral: it only uses the engine interface. llava-infer and the benchmarks use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from llava_rt.image_processor import ImageProcessorConfig, preprocess
from llava_rt.tokenizer import StreamingDetokenizer, TextProcessor

from .engine import Engine, load_engine
from .generate import GenerationRequest, check_prompt_fits, generate
from .kv_cache import image_key
from .sampling import SamplingParams


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float  # request in (image preprocessing included) to first token out
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens after the first, per second of decoding."""
        n = len(self.token_ids) - 1
        return n / (self.total_s - self.ttft_s) if n > 0 and self.total_s > self.ttft_s else 0.0


def user_message(question: str, with_image: bool) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


class Pipeline:
    def __init__(self, engine: Engine, text: TextProcessor, image_config: ImageProcessorConfig):
        self.engine, self.text, self.image_config = engine, text, image_config

    @classmethod
    def load(cls, model_dir: str | Path, backend: str = "torch", device: str = "cpu", dtype: str = "float32", **kw) -> "Pipeline":
        from llava_rt.config import LlavaConfig

        if not Path(model_dir).is_dir():
            raise ValueError(f"model directory {model_dir} not found; pass --model with a llava-hf style directory")
        # Cheap files first, so a broken directory fails before the weights load.
        config = LlavaConfig.load(model_dir)
        text = TextProcessor.load(model_dir, config.image_token_index, config.image_seq_length)
        image_config = ImageProcessorConfig.load(model_dir)
        return cls(load_engine(model_dir, backend=backend, device=device, dtype=dtype, **kw), text, image_config)

    def prompt_ids(self, messages: list[dict], num_images: int) -> list[int]:
        """The chat template applied and tokenized, each image expanded to its slots."""
        prompt = self.text.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.text.encode_prompt(prompt, num_images=num_images)
        check_prompt_fits(len(ids), self.engine.max_context)
        return ids

    def prepare(self, messages: list[dict], images: list[Image.Image], params: SamplingParams) -> GenerationRequest:
        ids = self.prompt_ids(messages, len(images))
        pixels = preprocess(images, self.image_config) if images else None
        embeds = self.engine.encode_images(pixels) if images else None
        # Content keys only for an engine that caches prefixes: hashing the pixels costs a little per image.
        caching = images and hasattr(self.engine, "prefix_keys") and self.engine.blocks.prefix_caching
        return GenerationRequest(ids, embeds, params, [image_key(p) for p in pixels] if caching else None)

    def chat(
        self,
        messages: list[dict],
        images: list[Image.Image],
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        start = time.perf_counter()
        request = self.prepare(messages, images, params)
        detok = StreamingDetokenizer(self.text, answer=True)
        first: list[float] = []
        pieces: list[str] = []

        def emit(piece: str) -> None:
            pieces.append(piece)
            if piece and on_text is not None:
                on_text(piece)

        def on_token(_: int, token: int) -> None:
            if not first:
                first.append(time.perf_counter() - start)
            emit(detok.add(token))

        out = generate(self.engine, [request], self.text.eos_token_ids, on_token=on_token)[0]
        emit(detok.flush())
        total = time.perf_counter() - start
        return Answer(
            text="".join(pieces),  # what was streamed: decode(tokens) without the separator's leading space
            token_ids=out.token_ids,
            finish_reason=out.finish_reason,
            prompt_tokens=out.prompt_tokens,
            ttft_s=first[0] if first else total,
            total_s=total,
        )
