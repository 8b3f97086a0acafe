"""The torch engine: batching must not change answers; the paged cache must be returned."""

import numpy as np
import pytest
import torch

from llava_rt.checkpoint import load_model
from llava_rt.model import DenseKV
from llava_rt.runtime.engine import SequenceInput, load_engine
from llava_rt.runtime.generate import GenerationRequest, generate
from llava_rt.runtime.kv_cache import BlockAllocator, CacheFullError, image_key, prefix_block_keys
from llava_rt.runtime.sampling import SamplingParams
from tiny import make_checkpoint, shared_image_requests, tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine") / "m", tiny_config(num_kv_heads=2))


def requests_for(engine, seed=0):
    cfg = engine.config
    gen = torch.Generator().manual_seed(seed)
    reqs = []
    for i, n_text in enumerate([4, 30, 11, 1, 19]):
        text = torch.randint(3, 290, (n_text,), generator=gen).tolist()
        if i % 2 == 0:  # image requests
            ids = [1, 5] + [cfg.image_token_index] * cfg.image_seq_length + text
            emb = engine.encode_images(torch.randn(1, 3, 28, 28, generator=gen).numpy())
        else:  # text-only requests are first-class
            ids, emb = [1] + text, None
        reqs.append(GenerationRequest(ids, emb, SamplingParams(max_new_tokens=6 + 5 * i)))
    return reqs


def test_batched_equals_alone(ckpt):
    engine = load_engine(ckpt, block_size=4)
    reqs = requests_for(engine)
    together = generate(engine, reqs, eos_token_ids=set())
    for req, out in zip(reqs, together):
        alone = generate(engine, [req], eos_token_ids=set())[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == req.params.max_new_tokens
    assert engine.num_free_blocks == engine.blocks.num_blocks


def test_overlapped_decode_equals_step_by_step(ckpt):
    """Greedy generate() one step ahead (decode_async: each step queued with the last one's tokens
    still on the device; the default on CUDA) gives the step-by-step tokens and finish reasons for
    requests that stop on EOS mid-batch, on their token budget and on the context, and frees every
    block."""
    engine = load_engine(ckpt, block_size=4)
    reqs = requests_for(engine)
    gen = torch.Generator().manual_seed(3)  # a text prompt 5 tokens short of the 256-token context
    reqs.append(GenerationRequest([1] + torch.randint(3, 290, (250,), generator=gen).tolist(), None,
                                  SamplingParams(max_new_tokens=40)))
    free_run = [o.token_ids for o in generate(engine, reqs, set())]
    eos = {free_run[0][2], free_run[4][5]}
    calls = []
    decode_async = engine.decode_async
    engine.decode_async = lambda seqs, toks: calls.append(len(seqs)) or decode_async(seqs, toks)
    outs = {}
    for overlap in (False, True):
        engine.overlap_decode = overlap
        outs[overlap] = [(o.token_ids, o.finish_reason) for o in generate(engine, reqs, eos)]
        assert engine.num_free_blocks == engine.blocks.num_blocks
    assert outs[True] == outs[False]
    assert [r for _, r in outs[True]].count("stop") >= 2 and outs[True][-1] == (free_run[-1][:5], "length")
    # The first step queued every request whose first token was not EOS, and a step a token after it
    # (the last token for length needs no step; a stop on EOS took one).
    assert calls[0] == sum(1 for t, _ in outs[True] if t)
    assert len(calls) == max(len(t) - (r == "length") for t, r in outs[True])
    sampled = [GenerationRequest(r.prompt_ids, r.image_embeds, SamplingParams(max_new_tokens=4, temperature=1.0, seed=1))
               for r in reqs[:2]]
    calls.clear()
    generate(engine, sampled, set())  # sampling needs the logits: step by step
    assert calls == []


def test_decode_async_reads_an_earlier_steps_tokens(ckpt):
    """A queued step reads the rows of an earlier step's tokens it is given, in any order: the same
    tokens as decode(greedy_only=True) fed those tokens from the host."""
    engine = load_engine(ckpt, block_size=4)
    reqs = requests_for(engine)[:3]
    got = []
    for mode in ("host", "device"):
        for s, r in enumerate(reqs):
            engine.prefill([SequenceInput(s, r.prompt_ids, r.image_embeds)])
        first = engine.decode_async([0, 1, 2], [7, 8, 9])
        if mode == "host":
            second = engine.decode([2, 0], first.result()[[2, 0]].tolist(), greedy_only=True)
        else:
            second = engine.decode_async([2, 0], (first, [2, 0])).result()
        got.append((first.result().tolist(), second.tolist()))
        with pytest.raises(ValueError, match="rows"):
            engine.decode_async([1], (first, [3]))
        for s in range(3):
            engine.release(s)
    assert got[0] == got[1]
    assert engine.num_free_blocks == engine.blocks.num_blocks


def test_onednn_linears_match_plain_linears(ckpt):
    """The CPU fp32 engine's oneDNN linears (the default where available, for layers from 768 x 768)
    give the plain nn.Linear engine's logits: prefill of every request, then two decode steps."""
    from llava_rt.runtime.torch_engine import OneDNNLinear, TorchEngine, use_onednn_linears

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    mixed = torch.nn.Sequential(torch.nn.Linear(768, 768), torch.nn.Linear(16, 16))
    use_onednn_linears(mixed)
    assert [type(m) for m in mixed] == [OneDNNLinear, torch.nn.Linear]  # small layers stay on MKL
    model = load_model(ckpt)
    use_onednn_linears(model, min_weights=0)  # every layer of the tiny model
    fast, plain = TorchEngine(model, block_size=4), TorchEngine.load(ckpt, block_size=4)
    assert sum(isinstance(m, OneDNNLinear) for m in fast.model.modules()) > 10
    assert not any(isinstance(m, OneDNNLinear) for m in plain.model.modules())
    for engine in (fast, plain):
        engine.out = []
        for i, req in enumerate(requests_for(engine)):
            engine.out.append(engine.prefill([SequenceInput(i, req.prompt_ids, req.image_embeds)]))
        for step in range(2):
            engine.out.append(engine.decode(list(range(5)), [7 + step] * 5))
    for a, b in zip(fast.out, plain.out):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_prefill_in_chunks_equals_whole(ckpt):
    engine = load_engine(ckpt, block_size=4)
    req = requests_for(engine)[1]  # text-only
    whole = engine.prefill([SequenceInput(100, req.prompt_ids)])
    engine.prefill([SequenceInput(101, req.prompt_ids[:7])])
    engine.prefill([SequenceInput(101, req.prompt_ids[7:20])])
    chunked = engine.prefill([SequenceInput(101, req.prompt_ids[20:])])
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=0)
    engine.release(100), engine.release(101)


def test_eos_stops_and_streams(ckpt):
    engine = load_engine(ckpt)
    req = requests_for(engine)[0]
    free_run = generate(engine, [req], eos_token_ids=set())[0].token_ids
    eos = free_run[3]
    streamed = []
    out = generate(engine, [req], eos_token_ids={eos}, on_token=lambda i, t: streamed.append(t))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free_run[: free_run.index(eos)]
    assert streamed == out.token_ids


def test_sampling_is_seeded_and_batch_independent(ckpt):
    engine = load_engine(ckpt)
    reqs = requests_for(engine)
    for r in reqs:
        r.params = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    together = [o.token_ids for o in generate(engine, reqs, set())]
    alone = [generate(engine, [r], set())[0].token_ids for r in reqs]
    assert together == alone
    greedy = generate(engine, [GenerationRequest(reqs[1].prompt_ids, None, SamplingParams(max_new_tokens=8))], set())
    assert together[1] != greedy[0].token_ids  # sampling at temperature 1.5 does sample


def test_padded_training_forward_matches_unpadded(ckpt):
    model = load_model(ckpt)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(3, 290, (1, 12), generator=gen)
    b = torch.randint(3, 290, (1, 7), generator=gen)
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, :7] = a[0], b[0]
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0], mask[1, :7] = 1, 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        torch.testing.assert_close(padded[0], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[1, :7], model(b)[0], atol=1e-5, rtol=0)


def test_dense_kv_matches_full_forward(ckpt):
    """The exporter's past/present path gives the same logits as one full forward."""
    model = load_model(ckpt)
    cfg = model.config.text_config
    ids = torch.randint(3, 290, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        empty = [torch.zeros(2, cfg.num_key_value_heads, 0, cfg.head_dim) for _ in range(cfg.num_hidden_layers)]
        kv = DenseKV(empty, list(empty), torch.ones(2, 6), [None] * 2, [None] * 2)
        first = model(ids[:, :6], kv=kv)
        kv2 = DenseKV(kv.present_k, kv.present_v, torch.ones(2, 10), [None] * 2, [None] * 2)
        rest = model(ids[:, 6:], positions=torch.arange(6, 10).expand(2, -1), kv=kv2)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=0)


def test_failed_step_loses_nothing(ckpt):
    engine = load_engine(ckpt)
    cfg = engine.config
    bad = [1] + [cfg.image_token_index] * cfg.image_seq_length  # image slots without an image
    with pytest.raises(ValueError, match="image"):
        engine.prefill([SequenceInput(7, bad)])
    assert engine.seq_len(7) == 0 and engine.num_free_blocks == engine.blocks.num_blocks
    with pytest.raises(ValueError, match="context"):
        engine.prefill([SequenceInput(8, [1] * (engine.max_context + 1))])
    assert engine.num_free_blocks == engine.blocks.num_blocks


def test_block_allocator():
    blocks = BlockAllocator(num_blocks=5, block_size=4)
    assert blocks.append(1, 6) == [b * 4 + o for b, o in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]]
    assert blocks.num_free_blocks == 3
    slots = blocks.append(2, 9)  # three blocks
    assert len(set(s // 4 for s in slots)) == 3 and blocks.num_free_blocks == 0
    assert not blocks.can_append({1: 3})
    assert blocks.can_append({1: 2})
    with pytest.raises(CacheFullError, match="KV cache full"):
        blocks.append(1, 3)
    blocks.truncate(2, 4)
    assert blocks.length(2) == 4 and blocks.num_free_blocks == 2
    blocks.release(1), blocks.release(2)
    assert blocks.num_free_blocks == 5 and not blocks.tables


def test_prefix_caching_gives_the_uncached_answers(ckpt):
    """Prompts that share an image with concurrent or earlier ones start on its cached KV blocks: the
    logits and tokens are those of an engine without prefix caching, whether the sharers come in one
    batch (the followers wait for a second pass over the blocks the first computed) or one after
    another, and every block comes back."""
    cached, plain = load_engine(ckpt, block_size=4), load_engine(ckpt, block_size=4, prefix_caching=False)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(7)).numpy()
    keys = [image_key(p) for p in pixels]
    want = [o.token_ids for o in generate(plain, shared_image_requests(plain, pixels, keys), set())]
    assert plain.blocks.stats["prefix_hit_tokens"] == 0 and plain.blocks.num_cached_blocks == 0
    got = [o.token_ids for o in generate(cached, shared_image_requests(cached, pixels, keys), set())]
    assert got == want
    shared = (3 + cached.config.image_seq_length) // 4 * 4  # the whole blocks of prefix + image
    assert cached.blocks.stats["prefix_hit_tokens"] >= 4 * shared  # the four followers
    reqs = shared_image_requests(cached, pixels, keys)[::-1]
    assert [o.token_ids for o in generate(cached, reqs, set())] == want[::-1]
    assert cached.blocks.stats["prefix_hit_tokens"] >= 10 * shared
    assert cached.num_free_blocks == cached.blocks.num_blocks
    # The logits of a prompt on a cached prefix, against a computed one.
    r = reqs[0]
    seqs = lambda: [SequenceInput(99, r.prompt_ids, r.image_embeds, r.image_keys)]  # noqa: E731
    hit_before = cached.blocks.stats["prefix_hit_tokens"]
    np.testing.assert_allclose(cached.prefill(seqs()), plain.prefill(seqs()), rtol=1e-4, atol=1e-5)
    assert cached.blocks.stats["prefix_hit_tokens"] > hit_before
    cached.release(99), plain.release(99)
    # Another image in the same place shares only the blocks before it.
    other = shared_image_requests(cached, pixels[::-1].copy(), [image_key(pixels[1]), "not-an-image-seen"])
    hit_before = cached.blocks.stats["prefix_hit_tokens"]
    generate(cached, other[1:2], set())
    assert cached.blocks.stats["prefix_hit_tokens"] - hit_before == 0  # the first block holds image rows


def test_next_turn_starts_past_the_answer(ckpt):
    """A finished answer's full blocks stay cached: a chat's next turn (the first turn, its answer, a new
    question) starts on them and gives the tokens and logits of an engine without prefix caching. Without
    the image keys nothing is kept."""
    cached, plain = load_engine(ckpt, block_size=4), load_engine(ckpt, block_size=4, prefix_caching=False)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3)).numpy()
    keys = [image_key(pixels[0])]
    first = shared_image_requests(cached, np.concatenate([pixels, pixels]), keys * 2)[0]
    first.params = SamplingParams(max_new_tokens=11, ignore_eos=True)
    answer = generate(cached, [first], set())[0].token_ids
    assert answer == generate(plain, [first], set())[0].token_ids
    assert cached.config.image_token_index not in answer  # random weights may write it; these do not
    kept = (len(first.prompt_ids) + len(answer) - 1) // 4  # the last token was never fed
    assert cached.blocks.num_cached_blocks == kept and kept * 4 > len(first.prompt_ids) + 4
    turn = first.prompt_ids + answer + [2, 7, 33, 41, 5]
    nxt = GenerationRequest(turn, first.image_embeds, SamplingParams(max_new_tokens=4), keys)
    hit_before = cached.blocks.stats["prefix_hit_tokens"]
    got = generate(cached, [nxt], set())[0].token_ids
    assert cached.blocks.stats["prefix_hit_tokens"] - hit_before == kept * 4
    assert got == generate(plain, [nxt], set())[0].token_ids
    seqs = lambda: [SequenceInput(98, turn, first.image_embeds, keys)]  # noqa: E731
    np.testing.assert_allclose(cached.prefill(seqs()), plain.prefill(seqs()), rtol=1e-4, atol=1e-5)
    cached.release(98), plain.release(98)
    # Without keys for its image a sequence caches nothing, on release as at prefill.
    cached.reset_prefix_cache()
    generate(cached, [GenerationRequest(first.prompt_ids, first.image_embeds, first.params)], set())
    assert cached.blocks.num_cached_blocks == 0 and cached.num_free_blocks == cached.blocks.num_blocks


def test_prefix_block_keys():
    image, L = 50, 6
    ids = [1, 2] + [image] * L + [7, 8, 9, 10, 11]  # 13 tokens: 3 whole blocks of 4
    a = prefix_block_keys(ids, ["A"], image, L, 4)
    assert len(a) == 3 and len(set(a)) == 3
    assert prefix_block_keys(ids, ["A"], image, L, 4) == a
    b = prefix_block_keys(ids, ["B"], image, L, 4)  # another image: every block holds image rows or follows them
    assert all(x != y for x, y in zip(a, b))
    c = prefix_block_keys(ids[:-1] + [12], ["A"], image, L, 4)  # the last token is past the whole blocks
    assert c == a
    d = prefix_block_keys(ids[:9] + [99] + ids[10:], ["A"], image, L, 4)  # a change in block 2 keeps 0 and 1
    assert d[:2] == a[:2] and d[2] != a[2]
    text = prefix_block_keys([1, 2, 3, 4, 5, 6, 7, 8], [], image, L, 4)
    assert len(text) == 2 and prefix_block_keys([1, 2, 3, 4, 9, 9, 9, 9], [], image, L, 4)[0] == text[0]


def test_block_allocator_prefix_cache():
    """Shared blocks are held until their last sequence lets go; idle cached blocks count as free and
    are evicted least recently used first, the end of a released prompt before its start."""
    a = BlockAllocator(num_blocks=6, block_size=4, prefix_caching=True)
    keys = [b"k0", b"k1", b"k2"]
    assert a.attach_prefix(1, keys, 11) == 0
    a.append(1, 11)
    a.commit(1)  # two whole blocks computed
    assert a.num_cached_blocks == 2 and a.cached_prefix(keys) == 2
    assert a.attach_prefix(2, keys, 11) == 8 and a.length(2) == 8
    assert a.tables[2] == a.tables[1][:2]
    with pytest.raises(ValueError, match="started"):
        a.attach_prefix(2, keys, 11)
    a.append(2, 3)
    assert a.num_free_blocks == 2  # 3 blocks of sequence 1, the third of sequence 2
    a.release(1)
    assert a.num_free_blocks == 3 and a.cached_prefix(keys) == 2
    a.release(2)
    assert a.num_free_blocks == 6 and a.num_cached_blocks == 2
    assert a.attach_prefix(3, [], 0) == 0
    a.append(3, 16)  # the four uncached blocks go first
    assert a.num_cached_blocks == 2
    a.append(3, 4)  # then the least recently used cached one: the end of the released prompt
    assert a.num_cached_blocks == 1 and a.cached_prefix(keys) == 1
    with pytest.raises(CacheFullError):
        a.append(3, 8)
    a.truncate(3, 4)
    a.release(3)
    a.reset_prefix_cache()
    assert a.num_free_blocks == 6 and a.num_cached_blocks == 0
    off = BlockAllocator(num_blocks=2, block_size=4)  # without prefix caching nothing is shared
    assert off.attach_prefix(1, keys, 11) == 0 and not off.started(1)
