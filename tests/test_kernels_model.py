"""The kernels' references agree with the model's own code, and the engine's kernel path with its torch path.

Like test_kernels.py: compiled kernels on CUDA, Triton's interpreter on the CPU (TRITON_INTERPRET=1
set before any kernel module is imported). The tiny model has head_dim 16, GQA 2.
"""

import numpy as np
import pytest
import torch
from kernels_setup import DEVICE, require_triton

require_triton()

from llava_rt.kernels.paged_attention import paged_decode_attention_ref, paged_prefill_attention_ref  # noqa: E402
from llava_rt.kernels.projector import fused_projector_ref  # noqa: E402
from llava_rt.kernels.rope_kv import rope_kv_write_ref, rope_tables  # noqa: E402
from llava_rt.model import (  # noqa: E402
    LlamaAttention,
    LlavaForConditionalGeneration,
    PagedKV,
    Projector,
    VisionFeatures,
    apply_rope,
    fuse_projections,
    init_weights,
    rope_cos_sin,
)
from llava_rt.runtime.engine import SequenceInput  # noqa: E402
from llava_rt.runtime.generate import GenerationRequest, generate  # noqa: E402
from llava_rt.runtime.kv_cache import image_key  # noqa: E402
from llava_rt.runtime.sampling import SamplingParams  # noqa: E402
from llava_rt.runtime.torch_engine import TorchEngine  # noqa: E402
from tiny import shared_image_requests, tiny_config  # noqa: E402



def paged_setup(cfg, lens_before, new, block_size=4, seed=0):
    """Caches, block tables and slots for sequences that hold lens_before tokens and add new ones."""
    gen = torch.Generator().manual_seed(seed)
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    b, t = len(new), max(new)
    max_blocks = max(-(-(a + n) // block_size) for a, n in zip(lens_before, new))
    num_blocks = b * max_blocks + 2
    kc = torch.randn(num_blocks, block_size, n_kv, d, generator=gen)
    vc = torch.randn(num_blocks, block_size, n_kv, d, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: b * max_blocks].view(b, max_blocks)
    slots = torch.full((b, t), -1, dtype=torch.long)
    positions = torch.zeros(b, t, dtype=torch.long)
    for row, (a, n) in enumerate(zip(lens_before, new)):
        pos = torch.arange(a, a + n)
        positions[row, :n] = pos
        slots[row, :n] = tables[row, pos // block_size] * block_size + pos % block_size
    ctx = torch.tensor([a + n for a, n in zip(lens_before, new)])
    return PagedKV([kc], [vc], slots, tables, ctx), positions


@pytest.mark.parametrize("new", [[1, 1, 1], [5, 9, 1]], ids=["decode", "prefill-chunks"])
def test_attention_references_match_model_paged(new):
    cfg = tiny_config(num_kv_heads=2).text_config
    attn = LlamaAttention(cfg, 0)
    kv, positions = paged_setup(cfg, [3, 17, 40], new)
    gen = torch.Generator().manual_seed(1)
    b, t, h, d = len(new), max(new), cfg.num_attention_heads, cfg.head_dim
    q = torch.randn(b, h, t, d, generator=gen)
    k = torch.randn(b, cfg.num_key_value_heads, t, d, generator=gen)
    v = torch.randn(b, cfg.num_key_value_heads, t, d, generator=gen)
    want = attn._paged(q, k, v, positions, kv).transpose(1, 2)  # [B, T, H, D]; also writes the cache
    kc, vc, scale = kv.k_caches[0], kv.v_caches[0], d**-0.5
    if t == 1:
        got = paged_decode_attention_ref(q[:, :, 0], kc, vc, kv.block_tables, kv.context_lens, scale)
        torch.testing.assert_close(got, want[:, 0], rtol=1e-5, atol=1e-5)
    else:
        q_lens = torch.tensor(new)
        got = paged_prefill_attention_ref(q.transpose(1, 2).reshape(b * t, h, d), kc, vc, kv.block_tables,
                                          torch.arange(b) * t, q_lens, kv.context_lens, scale).view(b, t, h, d)
        for row, n in enumerate(new):
            torch.testing.assert_close(got[row, :n], want[row, :n], rtol=1e-5, atol=1e-5)


def test_rope_reference_matches_model():
    n, h, d, theta = 11, 4, 32, 10000.0
    gen = torch.Generator().manual_seed(2)
    positions = torch.randint(0, 2000, (n,), generator=gen)
    x = torch.randn(n, h, d, generator=gen)
    cos, sin = rope_cos_sin(positions[None], d, theta, torch.float32)
    want = apply_rope(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    tc, ts = rope_tables(2048, d, theta)
    caches = [torch.zeros(4, 4, h, d) for _ in range(2)]
    slots = torch.arange(n)
    got = rope_kv_write_ref(x, x, x, positions, tc, ts, caches[0], caches[1], slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].view(-1, h, d)[:n], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].view(-1, h, d)[:n], x)


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_projector_reference_and_kernel_match_model(projector):
    cfg = tiny_config(projector=projector)
    model = LlavaForConditionalGeneration(cfg)
    init_weights(model, seed=3, std=0.2)
    model = model.to(DEVICE)
    p: Projector = model.multi_modal_projector
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, cfg.image_seq_length, cfg.vision_config.hidden_size, generator=gen).to(DEVICE)
    ids = [1, 5] + [cfg.image_token_index] * cfg.image_seq_length + [7, 8] + [cfg.image_token_index] * cfg.image_seq_length + [9]
    ids = torch.tensor([ids], device=DEVICE)
    with torch.no_grad():
        want = model.embed(ids, p(feats))  # the model's masked_scatter path
        rows = (ids[0] == cfg.image_token_index).nonzero().squeeze(1)
        l2 = p.linear_2
        ref = fused_projector_ref(feats.reshape(-1, feats.shape[-1]), p.linear_1.weight, p.linear_1.bias,
                                  None if l2 is None else l2.weight, None if l2 is None else l2.bias, p.act_name,
                                  model.language_model.embed_tokens(torch.where(ids == cfg.image_token_index, 0, ids))[0],
                                  rows)
        torch.testing.assert_close(ref, want[0], rtol=1e-5, atol=1e-5)
        got = model.embed(ids, VisionFeatures(feats, use_kernels=True))  # the fused Triton projector
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.embed(ids, VisionFeatures(feats, use_kernels=False)), want)


@pytest.fixture(scope="module")
def tiny_model():
    model = LlavaForConditionalGeneration(tiny_config(num_kv_heads=2))
    init_weights(model, seed=0, std=0.2)
    return model.to(DEVICE).eval()


def test_fuse_projections_keeps_the_weights_and_the_output():
    """q/k/v and gate/up become views into one matrix each: same state_dict, same logits."""
    model = LlavaForConditionalGeneration(tiny_config(num_kv_heads=2))
    init_weights(model, seed=3, std=0.2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        fuse_projections(model)
        got = model(ids)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    layer = model.language_model.layers[0]
    qkv = layer.self_attn.qkv_weight
    assert layer.self_attn.k_proj.weight.data_ptr() == qkv[layer.self_attn.q_proj.weight.shape[0]:].data_ptr()
    assert layer.mlp.gate_up_weight.shape[0] == 2 * layer.mlp.up_proj.weight.shape[0]
    fuse_projections(model)  # a second engine on the same model: the first one's graphs keep their tensors
    assert layer.self_attn.qkv_weight is qkv
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    moved = model.to(torch.float64)  # .to() carries the fused matrices along
    with torch.no_grad():
        torch.testing.assert_close(moved(ids).float(), want, rtol=1e-4, atol=1e-4)


def test_engine_kernel_path_matches_torch_path(tiny_model):
    """Greedy tokens and logits of the kernel path equal the torch path (fp32): images, text-only,
    a batch of mixed lengths, chunked prefill, 8 decode steps; and again through the static decode
    buffers (CUDA graphs on CUDA) with the batch of 3 padded to the bucket of 4."""
    cfg = tiny_model.config
    plain = TorchEngine(tiny_model, block_size=4, use_kernels=False, kv_cache_bytes=1 << 20)
    fast = TorchEngine(tiny_model, block_size=4, use_kernels=True, kv_cache_bytes=1 << 20)
    assert fast.rope_tables is not None
    static = TorchEngine(tiny_model, block_size=4, use_kernels=True, static_decode=True, max_num_seqs=4,
                         kv_cache_bytes=1 << 20)
    assert static.graphs.buckets == [1, 2, 4]
    replays = []
    run = static.graphs.run
    static.graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
    gen = torch.Generator().manual_seed(4)
    pixels = torch.randn(2, 3, 28, 28, generator=gen).numpy()
    reqs = []
    for i, n_text in enumerate([3, 21, 9]):
        text = torch.randint(3, 290, (n_text,), generator=gen).tolist()
        ids = [1] + ([cfg.image_token_index] * cfg.image_seq_length if i != 1 else []) + text
        reqs.append((ids, None if i == 1 else i // 2))
    outs = []
    # The static engine twice: step by step, then each step queued with the last one's tokens
    # still on the device (decode_async, the default on CUDA), budgets of 8 and 5 tokens.
    for engine, overlap in ((plain, False), (fast, False), (static, False), (static, True)):
        engine.overlap_decode = overlap
        embeds = engine.encode_images(pixels)
        rs = [GenerationRequest(ids, None if img is None else embeds[img : img + 1],
                                SamplingParams(max_new_tokens=8 - 3 * (i == 2)))
              for i, (ids, img) in enumerate(reqs)]
        outs.append([o.token_ids for o in generate(engine, rs, eos_token_ids=set())])
        assert engine.num_free_blocks == engine.blocks.num_blocks
    assert outs[0] == outs[1] == outs[2] == outs[3]
    assert replays and 3 in replays and 2 in replays, "decode steps must go through the static buffers"
    # Chunked prefill through the kernels: the same last-token logits as the torch path in one go.
    ids = reqs[1][0]
    whole = plain.prefill([SequenceInput(0, ids)])
    fast.prefill([SequenceInput(0, ids[:7])])
    chunked = fast.prefill([SequenceInput(0, ids[7:])])
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    plain.release(0), fast.release(0)


def test_prefill_graphs_and_greedy_decode_match_torch_path(tiny_model):
    """A whole prompt of one sequence goes through the prefill graphs' static buffers (CUDA graphs
    on CUDA), padded to its length bucket: the torch path's logits, and a cache that decodes the
    same. decode(greedy_only=True) gives the argmax of the logits decode gives, eager and through
    the decode graphs' buffers."""
    cfg = tiny_model.config
    plain = TorchEngine(tiny_model, block_size=4, use_kernels=False, kv_cache_bytes=1 << 20)
    static = TorchEngine(tiny_model, block_size=4, use_kernels=True, static_decode=True, max_num_seqs=4,
                         kv_cache_bytes=1 << 20)
    graphs = static.prefill_graphs
    graphs.step = 8  # buckets of 8 tokens: the prompts below are padded by 3, 5 and 7 rows
    seen = []
    run = graphs.run
    graphs.run = lambda embeds, *a: seen.append(embeds.shape[1]) or run(embeds, *a)
    gen = torch.Generator().manual_seed(6)
    pixels = torch.randn(1, 3, 28, 28, generator=gen).numpy()
    prompts = [[1] + [cfg.image_token_index] * cfg.image_seq_length + [5, 6, 7, 8],
               torch.randint(3, 290, (11,), generator=gen).tolist(),
               [1, 9] + [cfg.image_token_index] * cfg.image_seq_length + torch.randint(3, 290, (7,), generator=gen).tolist()]
    for seq, ids in enumerate(prompts):
        got_want = []
        for engine in (static, plain):
            img = engine.encode_images(pixels) if cfg.image_token_index in ids else None
            logits = [engine.prefill([SequenceInput(seq, ids, img)])]
            token = int(logits[0][0].argmax())
            for _ in range(3):
                logits.append(engine.decode([seq], [token]))
                engine.blocks.truncate(seq, engine.seq_len(seq) - 1)  # take that step back, and redo it
                greedy = engine.decode([seq], [token], greedy_only=True)
                assert greedy.shape == (1,) and int(greedy[0]) == int(logits[-1][0].argmax())
                token = int(greedy[0])
            got_want.append(np.concatenate(logits))
            engine.release(seq)
        np.testing.assert_allclose(*got_want, rtol=1e-4, atol=1e-4)
    assert seen == [21, 11, 25]
    # A batch of two prompts, or a prompt after cached tokens, runs eagerly.
    static.prefill([SequenceInput(7, prompts[1]), SequenceInput(8, prompts[1][:5])])
    static.prefill([SequenceInput(7, [4, 5])])
    assert len(seen) == 3
    static.release(7), static.release(8)
    for engine in (static, plain):  # greedy_only on a batch of two, padded to the bucket of 2
        for s, ids in enumerate(prompts[1:]):
            engine.prefill([SequenceInput(s, ids, engine.encode_images(pixels) if s else None)])
        logits = engine.decode([0, 1], [3, 4])
        for s in (0, 1):
            engine.blocks.truncate(s, engine.seq_len(s) - 1)
        assert engine.decode([0, 1], [3, 4], greedy_only=True).tolist() == logits.argmax(-1).tolist()
        engine.release(0), engine.release(1)


def test_prefix_caching_on_the_kernel_path(tiny_model):
    """Prompts that share an image, in one batch (the followers prefill on the leaders' cached blocks
    through the chunked-prefill kernel, and the fused projector writes only their images' last rows)
    and again one after another, through the static decode buffers (CUDA graphs on CUDA): the
    tokens of the torch path without prefix caching."""
    plain = TorchEngine(tiny_model, block_size=4, use_kernels=False, kv_cache_bytes=1 << 20, prefix_caching=False)
    static = TorchEngine(tiny_model, block_size=4, use_kernels=True, static_decode=True, max_num_seqs=8,
                         kv_cache_bytes=1 << 20)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(8)).numpy()
    keys = [image_key(p) for p in pixels]
    want = [o.token_ids for o in generate(plain, shared_image_requests(plain, pixels, keys), set())]
    for order in (slice(None), slice(None, None, -1)):
        got = [o.token_ids for o in generate(static, shared_image_requests(static, pixels, keys)[order], set())]
        assert got == want[order]
    assert static.blocks.stats["prefix_hit_tokens"] >= 10 * ((3 + tiny_model.config.image_seq_length) // 4 * 4)
    assert static.num_free_blocks == static.blocks.num_blocks


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (runs in the GPU suite)")
def test_cuda_engine_matches_cpu_fp32(tiny_model):
    """The engine on CUDA (kernels + CUDA graphs, each decode step queued before the last one's
    tokens are read) gives the CPU fp32 torch path's greedy tokens and finish reasons, alone and
    in a batch where requests stop on EOS and on their budgets at different steps."""
    import copy

    cuda = TorchEngine(tiny_model, block_size=16, kv_cache_bytes=1 << 22)
    assert cuda.use_kernels and cuda.graphs is not None and cuda.graphs.capture and cuda.overlap_decode
    cpu = TorchEngine(copy.deepcopy(tiny_model).cpu(), block_size=16, kv_cache_bytes=1 << 22)
    assert not cpu.overlap_decode
    cfg = tiny_model.config
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(5)).numpy()
    prompts = [[1, 5] + [cfg.image_token_index] * cfg.image_seq_length + list(range(10, 30)),
               list(range(40, 47)), list(range(50, 71)), [1] + list(range(80, 84))]
    outs = {}
    for engine in (cpu, cuda):
        def reqs(budgets):
            return [GenerationRequest(ids, engine.encode_images(pixels) if i == 0 else None, SamplingParams(max_new_tokens=n))
                    for i, (ids, n) in enumerate(zip(prompts, budgets))]
        alone = generate(engine, reqs([16])[:1], eos_token_ids=set())[0].token_ids
        free = [o.token_ids for o in generate(engine, reqs([16, 20, 9, 20]), eos_token_ids=set())]
        eos = {free[1][4], free[3][11]} if engine is cpu else eos
        batch = [(o.token_ids, o.finish_reason) for o in generate(engine, reqs([16, 20, 9, 20]), eos_token_ids=eos)]
        outs[engine.device.type] = alone, free, batch
        assert engine.num_free_blocks == engine.blocks.num_blocks
    assert outs["cpu"] == outs["cuda"]
    assert [r for _, r in outs["cuda"][2]].count("stop") >= 2


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (runs in the GPU suite)")
def test_cuda_scheduler_decodes_ahead(tmp_path):
    """The continuous-batching scheduler on CUDA decodes one step ahead (each step fed from the last
    one's device tokens): the CPU scheduler's answers, with requests joining mid-decode (small prefill
    chunks) and ending on their budgets at different steps."""
    from PIL import Image

    from llava_rt import LLM
    from llava_rt.random_checkpoint import make_random_checkpoint
    from llava_rt.runtime.scheduler import SchedulerConfig

    model_dir = make_random_checkpoint(tmp_path / "tiny", "tiny", std=0.2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    prompts = [{"prompt": q, "image": image} if i % 2 == 0 else q
               for i, q in enumerate(["What is here?", "Hi", "Describe it.", "Tell me a story.", "Colors?", "Ok"])]
    params = [SamplingParams(max_new_tokens=6 + 5 * i, ignore_eos=i % 3 == 0) for i in range(len(prompts))]
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model_dir, device=device, scheduler=SchedulerConfig(max_prefill_tokens=16))
        outs[device] = [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params, use_tqdm=False)]
        engine = llm.pipeline.engine
        assert engine.num_free_blocks == engine.blocks.num_blocks
    assert llm.pipeline.engine.overlap_decode and llm.scheduler.stats["decode_steps_ahead"] > 10
    assert outs["cuda"] == outs["cpu"]


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (runs in the GPU suite)")
def test_cuda_encode_graphs_match_eager(tiny_model):
    """The vision tower's CUDA graphs give the eager tower's features, and a replay does not
    overwrite what an earlier call returned (the engine caches encodings)."""
    engine = TorchEngine(tiny_model, block_size=16, kv_cache_bytes=1 << 22)
    assert engine.encode_graphs is not None
    gen = torch.Generator().manual_seed(9)
    inputs = [torch.randn(n, 3, 28, 28, generator=gen).numpy() for n in (1, 1, 2)]
    got = [engine.encode_images(x).features for x in inputs]
    with torch.inference_mode():
        for x, g in zip(inputs, got):
            want = tiny_model.vision_features(torch.from_numpy(x).to(DEVICE, engine.dtype))
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])
