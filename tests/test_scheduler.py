"""The continuous-batching scheduler: answers must not depend on batching, chunking or preemption,
and every KV block must come back."""

import os

import pytest
from PIL import Image

from llava_rt import LLM
from llava_rt.random_checkpoint import make_random_checkpoint
from llava_rt.runtime.llm import make_request, prompt_messages
from llava_rt.runtime.pipeline import Pipeline
from llava_rt.runtime.sampling import SamplingParams
from llava_rt.runtime.scheduler import Request, SchedulerConfig, chunk_end

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("sched") / "tiny", "tiny", std=0.2)


def mixed_prompts(n=10):
    images = [os.path.join(EXAMPLES, "shapes.png"), os.path.join(EXAMPLES, "gradient.jpg"),
              Image.new("RGB", (40, 70), (200, 30, 30))]
    questions = ["What is in the image?", "Describe the colors.", "How many shapes are there on the left side?",
                 "Hi", "Tell me a long story about a square and a circle who became friends."]
    prompts = []
    for i in range(n):
        q = questions[i % len(questions)]
        if i % 3 == 2:
            prompts.append(q)  # text-only
        elif i % 7 == 6:
            prompts.append({"prompt": q, "images": [images[0], images[1]]})  # two images
        else:
            prompts.append({"prompt": q, "image": images[(i // 2) % len(images)]})
    return prompts


def params_for(n):
    return [SamplingParams(max_new_tokens=4 + 3 * (i % 5), ignore_eos=i % 2 == 0) for i in range(n)]


def assert_all_blocks_free(llm):
    engine = llm.pipeline.engine
    assert engine.num_free_blocks == engine.blocks.num_blocks
    assert not llm.scheduler.running and not llm.scheduler.waiting


@pytest.fixture(scope="module")
def reference(model_dir):
    """Each prompt answered alone by the plain generate() path (no scheduler)."""
    pipe = Pipeline.load(model_dir)
    out = []
    for prompt, p in zip(mixed_prompts(), params_for(10)):
        messages, images = prompt_messages(prompt)
        out.append(pipe.chat(messages, images, p).token_ids)
    return out


def test_batched_equals_alone_and_reference(model_dir, reference):
    llm = LLM(model_dir)
    prompts, params = mixed_prompts(), params_for(10)
    together = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in together] == reference
    assert all(o.finished and o.finish_reason in ("stop", "length") for o in together)
    for i in (0, 2, 6):  # a few alone through the scheduler too
        assert llm.generate([prompts[i]], [params[i]], use_tqdm=False)[0].token_ids == reference[i]
    assert [o.text for o in together] == [llm.pipeline.text.decode(t).lstrip() for t in reference]
    assert_all_blocks_free(llm)
    # 3 distinct images, each encoded once however often it appears
    assert llm.scheduler.stats["images_encoded"] == 3


def test_chunked_prefill_same_answers(model_dir, reference):
    llm = LLM(model_dir, scheduler=SchedulerConfig(max_prefill_tokens=7))
    out = llm.generate(mixed_prompts(), params_for(10), use_tqdm=False)
    assert [o.token_ids for o in out] == reference
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_same_answers(model_dir, reference, prefix_caching):
    # 24 blocks of 4 tokens: each prompt fits alone (<= ~80 tokens) but far from all of them at once.
    # With prefix caching the prompts share their images' blocks and fit without preemption; the
    # answers must still be the same.
    block_bytes = 2 * 2 * 4 * 2 * 32 * 4  # K and V, 2 layers, 4 tokens, 2 kv heads, head dim 32, fp32
    llm = LLM(model_dir, scheduler=SchedulerConfig(max_prefill_tokens=16), block_size=4, kv_cache_bytes=24 * block_bytes,
              prefix_caching=prefix_caching)
    assert llm.pipeline.engine.blocks.num_blocks == 24
    out = llm.generate(mixed_prompts(), params_for(10), use_tqdm=False)
    assert (llm.scheduler.stats["preemptions"] > 0) != prefix_caching
    assert (llm.scheduler.stats["prefix_cached_tokens"] > 0) == prefix_caching
    assert [o.token_ids for o in out] == reference
    assert_all_blocks_free(llm)


def test_prefix_caching_same_answers(model_dir, reference):
    """Requests start on their images' cached blocks (attached at admission; the first chunk may
    start inside an image): in one run, where a request whose image another one is computing waits
    for it, and again once the first run has cached every prompt. The answers are the uncached
    ones, in big and small chunks, and without prefix caching too."""
    for chunk in (512, 7):
        llm = LLM(model_dir, scheduler=SchedulerConfig(max_prefill_tokens=chunk), block_size=4)
        first = llm.generate(mixed_prompts(), params_for(10), use_tqdm=False)
        first_hits = llm.scheduler.stats["prefix_cached_tokens"]
        again = llm.generate(mixed_prompts(), params_for(10), use_tqdm=False)
        assert [o.token_ids for o in first] == [o.token_ids for o in again] == reference
        image_tokens = llm.pipeline.engine.config.image_seq_length
        assert llm.scheduler.stats["prefix_cached_tokens"] >= 10 * image_tokens
        assert_all_blocks_free(llm)
        # The first run shared too: a request whose image an admitted request was computing waited
        # for it, then started on it (7 image prompts, 3 images).
        assert first_hits >= 4 * image_tokens
    plain = LLM(model_dir, prefix_caching=False)
    assert [o.token_ids for o in plain.generate(mixed_prompts(), params_for(10), use_tqdm=False)] == reference
    assert plain.scheduler.stats["prefix_cached_tokens"] == 0
    # A prompt that leaves the cached one right after its image: its cached prefix ends inside the
    # image (whole blocks only), so its first chunk starts on the image's last rows.
    first = make_request(llm.pipeline, *prompt_messages({"prompt": "Hi", "image": mixed_prompts()[0]["image"]}),
                         SamplingParams(max_new_tokens=5))
    ids = first.prompt_ids
    image_end = max(i for i, t in enumerate(ids) if t == llm.pipeline.engine.config.image_token_index) + 1
    assert image_end % 4, "the test needs an image that ends inside a block"
    llm.run([first], use_tqdm=False)
    before = llm.scheduler.stats["prefix_cached_tokens"]
    branch = lambda pipe: Request(ids[:image_end] + [(ids[image_end] + 1) % 300] + ids[image_end + 1 :],  # noqa: E731
                                  first.images, SamplingParams(max_new_tokens=5))
    got = llm.run([branch(llm.pipeline)], use_tqdm=False)[0].token_ids
    assert llm.scheduler.stats["prefix_cached_tokens"] - before == image_end // 4 * 4
    assert got == plain.run([branch(plain.pipeline)], use_tqdm=False)[0].token_ids
    assert_all_blocks_free(llm)


def test_next_turn_starts_past_the_answer(model_dir):
    """A finished request leaves its answer's full blocks cached, so a chat's next turn (the first
    prompt, the answer, a new question) starts past the answer, with the uncached answer."""
    llm = LLM(model_dir, block_size=4)
    plain = LLM(model_dir, prefix_caching=False)
    first = make_request(llm.pipeline, *prompt_messages({"prompt": "Hi", "image": mixed_prompts()[0]["image"]}),
                         SamplingParams(max_new_tokens=9, ignore_eos=True))
    answer = llm.run([first], use_tqdm=False)[0].token_ids
    turn = lambda: Request(first.prompt_ids + answer + [5, 17, 23], first.images, SamplingParams(max_new_tokens=5))  # noqa: E731
    before = llm.scheduler.stats["prefix_cached_tokens"]
    got = llm.run([turn()], use_tqdm=False)[0].token_ids
    in_cache = len(first.prompt_ids) + len(answer) - 1  # the last answer token was never fed
    assert llm.scheduler.stats["prefix_cached_tokens"] - before == in_cache // 4 * 4 > len(first.prompt_ids)
    assert got == plain.run([turn()], use_tqdm=False)[0].token_ids
    assert_all_blocks_free(llm)


def overlapped(llm):
    """Decode one step ahead as on CUDA (the CPU engine's decode_async runs each step at once)."""
    llm.pipeline.engine.overlap_decode = True
    return llm


@pytest.mark.parametrize("case", ["plain", "chunks of 7", "preemption"])
def test_decode_ahead_same_answers(model_dir, reference, case):
    """Greedy decoding one step ahead (each step queued on the last one's device tokens): the same
    answers as every request alone, whether requests join mid-decode (small chunks) or are preempted
    with a step in flight, and every block comes back."""
    block_bytes = 2 * 2 * 4 * 2 * 32 * 4  # as in test_preemption_same_answers: 24 blocks of 4 tokens
    kwargs = {"plain": {}, "chunks of 7": {"scheduler": SchedulerConfig(max_prefill_tokens=7)},
              "preemption": {"scheduler": SchedulerConfig(max_prefill_tokens=16), "block_size": 4,
                             "kv_cache_bytes": 24 * block_bytes, "prefix_caching": False}}[case]
    llm = overlapped(LLM(model_dir, **kwargs))
    out = llm.generate(mixed_prompts(), params_for(10), use_tqdm=False)
    assert [o.token_ids for o in out] == reference
    assert [o.finish_reason for o in out].count("stop") >= 1  # a stop on EOS with a step queued after it
    assert llm.scheduler.stats["decode_steps_ahead"] > 10
    assert (llm.scheduler.stats["preemptions"] > 0) == (case == "preemption")
    assert_all_blocks_free(llm)


def test_decode_ahead_stops_aborts_and_sampling(model_dir):
    """One step ahead: a stop string and an abort with a step in flight lose nothing; a sampled request
    in the batch runs every step the plain way, with its seeded answer."""
    llm = overlapped(LLM(model_dir))
    prompt = {"prompt": "Describe the colors.", "image": os.path.join(EXAMPLES, "shapes.png")}
    full = llm.generate([prompt], SamplingParams(max_new_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    stop = full.text[8:11]
    r = llm.request(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True), stop=[stop])
    longer = llm.request(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))
    pieces = []
    r.on_output = pieces.append
    s = llm.scheduler
    s.add(r), s.add(longer)
    while r.finish_reason is None:
        s.step()
    assert pieces[-1].text == full.text[: full.text.find(stop)]
    assert s.stats["decode_steps_ahead"] > 0 and longer.ahead
    assert s.abort(longer.request_id)
    assert_all_blocks_free(llm)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    alone = llm.generate([prompt], [sampled], use_tqdm=False)[0].token_ids
    both = llm.generate([prompt, prompt], [SamplingParams(max_new_tokens=12, ignore_eos=True), sampled], use_tqdm=False)
    assert both[1].token_ids == alone and both[0].token_ids == full.token_ids[:12]


def test_cancellation_frees_blocks_at_once(model_dir):
    llm = LLM(model_dir)
    s = llm.scheduler
    reqs = [llm.request(p, SamplingParams(max_new_tokens=50, ignore_eos=True)) for p in mixed_prompts(4)]
    seen = []
    for r in reqs:
        r.on_output = seen.append
        s.add(r)
    for _ in range(3):
        s.step()
    engine = llm.pipeline.engine
    assert engine.num_free_blocks < engine.blocks.num_blocks
    for r in reqs:
        assert s.abort(r.request_id)
    assert_all_blocks_free(llm)
    assert sum(1 for o in seen if o.finished and o.finish_reason == "abort") == 4
    assert not s.abort(reqs[0].request_id)  # gone already


def test_stop_strings_and_streaming(model_dir):
    llm = LLM(model_dir)
    prompt = {"prompt": "Describe the colors.", "image": os.path.join(EXAMPLES, "shapes.png")}
    full = llm.generate([prompt], SamplingParams(max_new_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert len(full.text) > 12, full.text
    stop = full.text[8:11]
    cut = full.text[: full.text.find(stop)]
    r = llm.request(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True), stop=[stop])
    pieces = []
    r.on_output = lambda o: pieces.append(o)
    llm.scheduler.add(r)
    while llm.scheduler.has_work():
        llm.scheduler.step()
    assert pieces[-1].finish_reason == "stop" and pieces[-1].text == cut
    assert "".join(o.delta for o in pieces) == cut  # streamed deltas add up, the stop string never streamed
    assert_all_blocks_free(llm)


def test_seeded_sampling_independent_of_batch(model_dir):
    llm = LLM(model_dir)
    prompts = mixed_prompts(4)
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=i) for i in range(4)]
    together = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], [sp], use_tqdm=False)[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone


def test_chunk_end_never_splits_an_image():
    img = 9
    ids = [1, 2] + [img] * 4 + [3, 4, 5] + [img] * 4 + [6]
    assert chunk_end(ids, 0, 4, img, 4) == 2  # would split the first image: cut before it
    assert chunk_end(ids, 2, 2, img, 4) == 6  # the image alone is over budget: it goes whole
    assert chunk_end(ids, 0, 100, img, 4) == len(ids)
    assert chunk_end(ids, 6, 3, img, 4) == 9


def test_infer_batch_jsonl(model_dir, tmp_path, capsys):
    import json

    from llava_rt.runtime.infer_cli import main

    shapes = os.path.join(EXAMPLES, "shapes.png")
    lines = [
        json.dumps({"id": "a", "question": "What is in the image?", "image": shapes, "max_tokens": 6}),
        "{not json",
        json.dumps({"id": "b", "question": "Hello", "max_tokens": 5}),
        json.dumps({"id": "c", "question": "What?", "image": "missing.png"}),
        "",
        json.dumps({"id": "d", "question": "Describe the colors.", "images": [shapes, "../examples/gradient.jpg"],
                    "max_tokens": 7}),
        json.dumps({"id": "e", "image": shapes}),
    ]
    (tmp_path / "sub").mkdir()
    src = os.path.join(EXAMPLES, "gradient.jpg")
    os.makedirs(tmp_path / "examples", exist_ok=True)
    with open(src, "rb") as f, open(tmp_path / "examples" / "gradient.jpg", "wb") as g:
        g.write(f.read())
    path = tmp_path / "sub" / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = main(["--model", str(model_dir), "--batch", str(path)])
    out, err = capsys.readouterr()
    results = [json.loads(x) for x in out.splitlines()]
    assert code == 1  # some lines were bad
    assert [(r["line"], r["id"]) for r in results] == [(1, "a"), (3, "b"), (6, "d")]
    assert [e.split(":")[2].strip() for e in err.strip().splitlines()] == [f"{path} line {n}" for n in (2, 4, 7)]
    assert "missing.png" in err
    main(["--model", str(model_dir), shapes, "What is in the image?", "--max-new-tokens", "6", "--json"])
    alone = json.loads(capsys.readouterr().out)
    assert results[0]["answer"] == alone["answer"] and results[0]["completion_tokens"] == alone["completion_tokens"]
    assert results[1]["completion_tokens"] <= 5 and results[2]["prompt_tokens"] > 32  # two images


def test_onnxruntime_engine_under_the_scheduler(model_dir, reference, tmp_path):
    """Backend-neutral: the same batched, chunked, preempting schedule on the onnxruntime engine."""
    import shutil

    from llava_rt.export.onnx_export import export_onnx

    model_dir = shutil.copytree(model_dir, tmp_path / "m")  # the export must not change other tests' backend
    export_onnx(model_dir, model_dir / "onnx", progress=False)
    block_bytes = 2 * 2 * 4 * 2 * 32 * 4
    llm = LLM(model_dir, backend="onnxruntime", scheduler=SchedulerConfig(max_prefill_tokens=16), block_size=4,
              kv_cache_bytes=24 * block_bytes)
    out = llm.generate(mixed_prompts(), params_for(10), use_tqdm=False)
    assert llm.scheduler.stats["preemptions"] > 0
    assert [o.token_ids for o in out] == reference
    assert_all_blocks_free(llm)
    assert not llm.pipeline.engine.caches  # the engine's own KV buffers are gone too
