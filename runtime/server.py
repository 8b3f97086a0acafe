"""llava-serve MODEL: an OpenAI-compatible chat server over the batching engine.

    llava-serve models/llava-rt-default            # http://127.0.0.1:8000/v1
    curl 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}'

Endpoints: POST /v1/chat/completions (text and image_url parts, stream: true as server-sent
events), GET /v1/models, /health, /metrics (Prometheus). Images come inline as data: URLs, or
as file:// URLs under --allowed-local-media-path; remote URLs are refused (no server-side
fetches). Errors use OpenAI's error body. SIGTERM: new requests get 503, requests in flight
finish within --shutdown-timeout, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_rt.image_processor import load_image

from .llm import AsyncLLM, QueueFullError, ShuttingDownError, make_request
from .sampling import SamplingParams
from .scheduler import RequestOutput

PROG = "llava-serve"
log = logging.getLogger("llava_rt.server")


@dataclass
class ServerLimits:
    max_body_bytes: int = 20 << 20
    max_image_pixels: int = 20_000_000
    max_images: int = 4  # per request
    max_tokens: int = 2048  # the most a request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_context: int | None = None  # prompt + max_tokens; None: the model's context
    allowed_media_dir: Path | None = None  # file:// image URLs only below this directory


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---------------------------------------------------------------------- the request body


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension, as vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # extension, as vLLM (benchmarks)


def image_from_url(url: str, limits: ServerLimits, param: str):
    """data: URLs inline; file:// only under the operator's directory; nothing remote."""
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, "image data: URLs must be base64 (data:image/png;base64,...)", param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image data: URL is not valid base64", param, "invalid_image") from None
        source: Any = raw
    elif url.startswith("file:"):
        if limits.allowed_media_dir is None:
            raise ApiError(400, "file:// image URLs are off; the server operator can allow a directory with "
                                "--allowed-local-media-path", param)
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(Path(limits.allowed_media_dir).resolve()):
            raise ApiError(400, f"file:// image URLs must lie under {limits.allowed_media_dir}", param)
        source = path
    else:
        raise ApiError(400, "remote image URLs are refused; send the image inline as a data: URL", param)
    try:
        return load_image(source, max_pixels=limits.max_image_pixels)
    except ValueError as e:  # ProcessorError: names what is wrong with the image
        raise ApiError(400, str(e), param, "invalid_image") from None


def to_messages(body: ChatRequest, limits: ServerLimits) -> tuple[list[dict], list]:
    messages, images = [], []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts = []
        for j, part in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise ApiError(422, "a text part needs a text field", param)
                parts.append({"type": "text", "text": part.text})
            else:
                if part.image_url is None:
                    raise ApiError(422, "an image_url part needs an image_url field", param)
                if len(images) >= limits.max_images:
                    raise ApiError(400, f"at most {limits.max_images} images per request", param)
                images.append(image_from_url(part.image_url.url, limits, param))
                parts.append({"type": "image"})
        messages.append({"role": m.role, "content": parts})
    return messages, images


# ---------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self, llm: AsyncLLM):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        Gauge("llava_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(lambda: llm.num_waiting)
        Gauge("llava_running_requests", "Requests in the running batch", registry=r).set_function(lambda: llm.num_running)
        Gauge("llava_kv_cache_usage_ratio", "Share of KV-cache blocks in use", registry=r).set_function(lambda: llm.kv_usage)
        Gauge("llava_prefix_cache_hit_tokens", "Prompt tokens found in the KV cache (prefix caching), since start",
              registry=r).set_function(lambda: llm.scheduler.stats["prefix_cached_tokens"])
        self.ttft = Histogram("llava_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("llava_time_per_output_token_seconds", "Decode time per token after the first",
                              registry=r, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5))
        self.finished = Counter("llava_requests", "Finished requests by reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("llava_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("llava_generation_tokens", "Generated tokens", registry=r)

    def observe(self, out: RequestOutput) -> None:
        self.finished.labels(out.finish_reason).inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(len(out.token_ids))
        if out.ttft_s is not None:
            self.ttft.observe(out.ttft_s)
            if len(out.token_ids) > 1 and out.latency_s is not None:
                self.tpot.observe((out.latency_s - out.ttft_s) / (len(out.token_ids) - 1))


# ---------------------------------------------------------------------- the app


def build_app(llm: AsyncLLM, model_name: str, limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    model_context = llm.pipeline.engine.max_context
    asked = min(limits.max_context or model_context, model_context)
    # A request must fit the whole KV cache even when it runs alone (as vLLM's max_model_len must).
    kv_tokens = llm.scheduler.num_blocks * llm.scheduler.block_size
    context = min(asked, kv_tokens)
    context_note = (f" (the KV cache holds {kv_tokens} tokens; give the server more with --kv-cache-bytes)"
                    if kv_tokens < asked else "")
    metrics = Metrics(llm)
    app = FastAPI(title=PROG)
    app.state.llm, app.state.metrics = llm, metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        if not llm.accepting:
            return error_response(503, "shutting down")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llava-rt",
                                            "max_model_len": context}]}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            req, body = await parse_request(request)
            gen = llm.generate(req)
            first = await anext(gen)  # queue full / shutting down raise here, before any response
            if first.finish_reason == "error":
                return error_response(500, first.error or "generation failed")
        except ApiError as e:
            return error_response(e.status, e.message, e.param, e.code)
        except QueueFullError as e:
            return error_response(429, str(e), code="queue_full")
        except ShuttingDownError as e:
            return error_response(503, str(e))
        rid, created = f"chatcmpl-{req.request_id}", int(time.time())
        if body.stream:
            return StreamingResponse(sse(gen, first, rid, created, body), media_type="text/event-stream")
        return await complete(request, gen, first, rid, created)

    async def parse_request(request: Request):
        if not llm.accepting:
            raise ApiError(503, "the server is shutting down")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is {size} bytes, over the limit of {limits.max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {limits.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        try:
            body = ChatRequest.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            raise ApiError(422, f"{err['msg']} at {'.'.join(map(str, err['loc']))}",
                           ".".join(map(str, err["loc"]))) from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}, over this server's limit of {limits.max_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])

        def prepare():  # image decoding and tokenizing: off the event loop
            messages, images = to_messages(body, limits)
            try:
                ids_req = make_request(llm.pipeline, messages, images, SamplingParams(), stop, uuid.uuid4().hex)
            except ValueError as e:  # the prompt outgrew the context, a template error, ...
                raise ApiError(400, str(e), "messages") from None
            return ids_req

        req = await run_in_threadpool(prepare)
        n_prompt = len(req.prompt_ids)
        if max_tokens is None:
            max_tokens = max(1, min(limits.default_max_tokens, context - n_prompt))
        if n_prompt + max_tokens > context:
            raise ApiError(400, f"the prompt is {n_prompt} tokens and max_tokens {max_tokens}: over the context of "
                                f"{context} tokens{context_note}; lower max_tokens or shorten the prompt", "max_tokens",
                           "context_length_exceeded")
        req.params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos)
        return req, body

    async def complete(request: Request, gen, out: RequestOutput, rid: str, created: int):
        async def collect(out):
            while not out.finished:
                out = await anext(gen)
            return out

        task = asyncio.ensure_future(collect(out))
        while not task.done():  # a client that hangs up cancels its request
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # the cancellation reaches gen, whose clean-up aborts the request
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
        out = task.result()
        metrics.observe(out)
        if out.finish_reason in ("error", "abort"):
            return error_response(500, out.error or "the request was aborted")
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": out.finish_reason, "logprobs": None}],
            "usage": usage(out),
        }

    async def sse(gen, out: RequestOutput, rid: str, created: int, body: ChatRequest):
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:  # leaving this generator early (the client went away) closes gen, which aborts the request
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if out.delta:
                    yield chunk({"content": out.delta})
                if out.finished:
                    break
                out = await anext(gen)
            metrics.observe(out)
            if out.finish_reason in ("error", "abort"):
                err = {"message": out.error or "aborted", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
            else:
                yield chunk({}, out.finish_reason)
                if (body.stream_options or {}).get("include_usage"):
                    payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                               "choices": [], "usage": usage(out)}
                    yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()

    return app


def usage(out: RequestOutput) -> dict:
    n = len(out.token_ids)
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": n, "total_tokens": out.prompt_tokens + n}


# ---------------------------------------------------------------------- llava-serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = ServerLimits()
    p = argparse.ArgumentParser(prog=PROG, description="Serve a LLaVA model with an OpenAI-compatible API.")
    p.add_argument("model", type=Path, help="model directory (llava-hf layout, or a llava-export directory)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients name (default: the directory name)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests in the running batch at most")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens per step (chunked prefill)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt whole (torch backend; by default a prompt that starts like an earlier one, "
                        "the same image and text, reuses its cached KV blocks)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-images-per-request", type=int, default=d.max_images)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="the largest max_tokens a request may ask")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--max-context", type=int, help="prompt + max_tokens limit (default: the model's context)")
    p.add_argument("--allowed-local-media-path", type=Path, help="serve file:// image URLs from under this directory")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .infer_cli import choose_backend
    from .scheduler import SchedulerConfig

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    backend = args.backend if args.backend != "auto" else choose_backend(args.model, args.device, args.dtype)
    try:
        llm = AsyncLLM.load(args.model, backend=backend, device=args.device, dtype=args.dtype,
                            config=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens),
                            max_queue=args.max_queue, kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                            **({"prefix_caching": not args.no_prefix_caching} if backend == "torch" else {}))
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    limits = ServerLimits(args.max_body_bytes, args.max_image_pixels, args.max_images_per_request, args.max_tokens,
                          args.default_max_tokens, args.max_context, args.allowed_local_media_path)
    app = build_app(llm, args.served_model_name or args.model.resolve().name, limits)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = DrainingServer(config, llm)
    log.info("%s backend on %s:%d", backend, args.host, args.port)
    server.run()
    llm.shutdown(timeout_s=1.0)  # whatever outlived the deadline is aborted
    return 0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, llm: AsyncLLM):
        super().__init__(config)
        self.llm = llm

    def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: new requests get 503 while those in flight finish
        self.llm.accepting = False
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
