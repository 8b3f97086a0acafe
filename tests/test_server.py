"""llava-serve on loopback: the official openai client, 64 concurrent mixed requests, bad requests
failing alone, client disconnects, limits, metrics, and a SIGTERM drain of the real console script."""

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from llava_rt.image_processor import load_image
from llava_rt.random_checkpoint import make_random_checkpoint
from llava_rt.runtime.llm import AsyncLLM
from llava_rt.runtime.pipeline import Pipeline
from llava_rt.runtime.sampling import SamplingParams
from llava_rt.runtime.scheduler import SchedulerConfig
from llava_rt.runtime.server import ServerLimits, build_app

EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples"))
SHAPES = os.path.join(EXAMPLES, "shapes.png")
GRADIENT = os.path.join(EXAMPLES, "gradient.jpg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path=None, raw=None, mime="image/png") -> str:
    raw = raw if raw is not None else open(path, "rb").read()
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def png_bytes(size, color=(10, 200, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", "tiny", std=0.2)


@pytest.fixture(scope="module")
def server(model_dir):
    llm = AsyncLLM.load(model_dir, config=SchedulerConfig(max_num_seqs=64, max_prefill_tokens=256), max_queue=256)
    limits = ServerLimits(max_body_bytes=300_000, max_image_pixels=500 * 500, max_images=2, max_tokens=1000,
                          allowed_media_dir=EXAMPLES)
    app = build_app(llm, "tiny", limits)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield llm, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    llm.shutdown(1)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Answers of requests run alone through the plain Pipeline.chat path (no scheduler, no server)."""
    pipe = Pipeline.load(model_dir)
    cache = {}

    def answer(question, image=None, max_tokens=8):
        key = (question, image, max_tokens)
        if key not in cache:
            content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
            images = [load_image(image)] if image else []
            cache[key] = pipe.chat([{"role": "user", "content": content}], images, SamplingParams(max_new_tokens=max_tokens)).text
        return cache[key]

    return answer


def user(question, image=None):
    if image is None:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": question}]}]


def wait_idle(llm, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not llm.idle() and time.monotonic() < deadline:
        time.sleep(0.02)
    engine = llm.pipeline.engine
    return engine.num_free_blocks == engine.blocks.num_blocks and llm.idle()


def test_openai_client_image_text_stream(server, reference):
    llm, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for image in (SHAPES, None):
        r = client.chat.completions.create(model="tiny", messages=user("What is in the image?", image), max_tokens=10,
                                           temperature=0)
        assert r.choices[0].message.content == reference("What is in the image?", image, 10)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > (16 if image else 0)
        stream = client.chat.completions.create(model="tiny", messages=user("What is in the image?", image),
                                                max_tokens=10, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert wait_idle(llm)


def test_64_concurrent_mixed_requests(server, reference):
    llm, url = server
    questions = ["What is in the image?", "Describe the colors.", "How many shapes?", "Hello", "Tell me a story."]
    cases = []
    for i in range(64):
        image = [SHAPES, GRADIENT, None][i % 3]
        cases.append((questions[i % 5], image, 4 + i % 9, i % 4 == 0))

    async def run():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(q, image, n, stream):
            kw = dict(model="tiny", messages=user(q, image), max_tokens=n, temperature=0)
            if stream:
                chunks = [c async for c in await client.chat.completions.create(stream=True, **kw)]
                return "".join(c.choices[0].delta.content or "" for c in chunks)
            return (await client.chat.completions.create(**kw)).choices[0].message.content

        return await asyncio.gather(*(one(*c) for c in cases))

    answers = asyncio.run(run())
    assert answers == [reference(q, image, n) for q, image, n, _ in cases]
    assert len(set(answers)) > 5  # the cases really differ
    assert wait_idle(llm)


def test_bad_requests_fail_alone(server, reference):
    llm, url = server
    good = {"model": "tiny", "messages": user("Hello", SHAPES), "max_tokens": 6, "temperature": 0}

    def with_image(image_url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                          {"type": "text", "text": "hi"}]}], "max_tokens": 4}

    bad = [
        (with_image("data:image/png;base64,@@not base64!!"), 400, "base64"),
        (with_image(data_url(raw=b"just some text, not an image")), 400, "not an image"),
        (with_image(data_url(raw=png_bytes((600, 600)))), 400, "over the limit"),
        (with_image("https://example.com/cat.png"), 400, "remote"),
        (with_image("file:///etc/passwd"), 400, "must lie under"),
        ({"model": "tiny"}, 422, "messages"),
        ({"messages": [{"role": "user"}]}, 422, "content"),
        ({"messages": user("hi"), "max_tokens": 900}, 400, "context"),
        ({"messages": user("hi"), "max_tokens": 5000}, 400, "limit"),
        ({"messages": user("x" * 310_000)}, 413, "limit"),
    ]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def post(body):
                return await client.post("/v1/chat/completions", json=body)

            tasks = [post(good) for _ in range(4)] + [post(b) for b, _, _ in bad]
            tasks.append(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}))
            return await asyncio.gather(*tasks)

    responses = asyncio.run(run())
    for r in responses[:4]:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == reference("Hello", SHAPES, 6)
    for r, (_, status, needle) in zip(responses[4:], bad):
        assert r.status_code == status, (status, r.text)
        err = r.json()["error"]
        assert needle in err["message"] and err["type"]
    assert responses[-1].status_code == 400 and "JSON" in responses[-1].json()["error"]["message"]
    # a file:// URL under the allowed directory works
    ok = httpx.post(url + "/v1/chat/completions", json=with_image("file://" + SHAPES), timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert wait_idle(llm)


def test_client_disconnect_cancels(server, monkeypatch):
    llm, url = server
    step = llm.scheduler.step

    def slow_step():  # the tiny model decodes ~1,000 tokens/s: make "still generating at the hang-up" certain
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(llm.scheduler, "step", slow_step)
    aborted = llm.scheduler.stats["aborted"]
    body = {"messages": user("Tell me a story."), "max_tokens": 440, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    # non-streaming too: the server notices the hang-up while generating
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    assert wait_idle(llm, 10)
    assert llm.scheduler.stats["aborted"] == aborted + 2


def test_metrics(server):
    llm, url = server
    hits = llm.scheduler.stats["prefix_cached_tokens"]
    for _ in range(2):  # the second starts on the first one's cached prompt blocks
        httpx.post(url + "/v1/chat/completions", json={"messages": user("Hello, metrics"), "max_tokens": 3}, timeout=60)
    text = httpx.get(url + "/metrics").text
    for name in ("llava_queue_depth", "llava_running_requests", "llava_kv_cache_usage_ratio",
                 "llava_time_to_first_token_seconds_bucket", "llava_time_per_output_token_seconds_bucket"):
        assert name in text
    cached = [line for line in text.splitlines() if line.startswith("llava_prefix_cache_hit_tokens ")]
    assert float(cached[0].split()[-1]) >= hits + llm.scheduler.block_size
    count = [line for line in text.splitlines() if line.startswith("llava_time_to_first_token_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def test_queue_full_and_shutting_down(model_dir, server):
    llm, _ = server
    full = AsyncLLM(llm.pipeline, max_queue=0)  # shares the engine; never runs anything here
    app = build_app(full, "tiny")

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = {"messages": user("Hello"), "max_tokens": 3}
            r429 = await client.post("/v1/chat/completions", json=body)
            full.accepting = False
            r503 = await client.post("/v1/chat/completions", json=body)
            health = await client.get("/health")
            return r429, r503, health

    r429, r503, health = asyncio.run(run())
    full.shutdown(0)
    assert r429.status_code == 429 and r429.json()["error"]["type"] == "rate_limit_error"
    assert r503.status_code == 503 and health.status_code == 503


def test_async_llm_loads_on_its_engine_thread(model_dir, tmp_path):
    """The weights load on the engine thread (one OpenMP pool in the process); a load that fails
    raises the loader's error in the caller and leaves no thread behind."""
    engines = lambda: sum(t.name == "llava-engine" for t in threading.enumerate())  # noqa: E731
    before = engines()
    with pytest.raises(ValueError, match="not found"):
        AsyncLLM.load(tmp_path / "missing")
    time.sleep(0.1)
    assert engines() == before
    seen = []
    real = Pipeline.load

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    llm = AsyncLLM(lambda: spy(model_dir))
    llm.shutdown(1)
    assert seen == ["llava-engine"]


def test_small_kv_cache_and_local_file_limits(model_dir, server, tmp_path):
    """A prompt the whole KV cache cannot hold is a 400 naming --kv-cache-bytes (not a 500 from the
    engine); a file:// image over the pixel limit is a 400 like an inline one."""
    llm, _ = server
    engine = llm.pipeline.engine
    per_block = sum(c.nbytes for c in engine.k_caches + engine.v_caches) // engine.blocks.num_blocks
    small = AsyncLLM.load(model_dir, kv_cache_bytes=2 * per_block)  # 2 blocks of 16: 32 tokens
    assert small.scheduler.num_blocks * small.scheduler.block_size == 32
    Image.new("RGB", (600, 600), (200, 30, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "small.png")
    app = build_app(small, "tiny", ServerLimits(max_image_pixels=500 * 500, allowed_media_dir=tmp_path))

    def image_body(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "hi"}]}], "max_tokens": 2}

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as client:
            post = lambda body: client.post("/v1/chat/completions", json=body)  # noqa: E731
            # greedy: the server samples at temperature 1 by default, and a sampled answer may be empty
            return await asyncio.gather(post({"messages": user("hi"), "max_tokens": 4, "temperature": 0}),  # 19 + 4: fits
                                        post(image_body("file://" + str(tmp_path / "small.png"))),  # 36 tokens
                                        post(image_body("file://" + str(tmp_path / "big.png"))),
                                        client.get("/v1/models"))

    try:
        fits, too_long, big, models = asyncio.run(run())
    finally:
        small.shutdown(5)
    assert fits.status_code == 200, fits.text
    assert fits.json()["choices"][0]["message"]["content"]
    assert too_long.status_code == 400, too_long.text
    assert "KV cache holds 32 tokens" in too_long.json()["error"]["message"]
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert big.status_code == 400 and "over the limit" in big.json()["error"]["message"], big.text
    assert models.json()["data"][0]["max_model_len"] == 32


def test_sigterm_drains_in_flight_requests(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llava_rt.runtime.server", str(model_dir), "--port", str(port),
                             "--backend", "torch", "--shutdown-timeout", "30", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"messages": user("Tell me a story."), "max_tokens": 200, "ignore_eos": True, "stream": True}
        pieces = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            pieces.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            pieces.extend(line for line in lines if line)
        assert pieces[-1] == "data: [DONE]"
        assert any('"finish_reason": "length"' in p for p in pieces)
        # uvicorn re-raises the SIGTERM once drained, so the exit status says "ended by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
