"""Our model against transformers' LlavaForConditionalGeneration on the same safetensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_rt.checkpoint import load_model, save_checkpoint
from llava_rt.runtime.engine import load_engine
from llava_rt.runtime.generate import GenerationRequest, generate
from llava_rt.runtime.sampling import SamplingParams
from tiny import make_checkpoint, tiny_config

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "mha-default-mlp": dict(),
    "gqa2-last-layer": dict(num_kv_heads=2, feature_layer=-1),
    "mqa-full-tied": dict(num_kv_heads=1, strategy="full", tie=True),
    "layer-list-gelu": dict(feature_layer=[-3, -1], vision_act="gelu"),
    "layer-list-full-gqa": dict(feature_layer=[0, -2], strategy="full", num_kv_heads=2),
    "linear-projector": dict(projector="linear"),
    "linear-gqa-tied-full": dict(projector="linear", num_kv_heads=2, tie=True, strategy="full", feature_layer=-1),
}


def hf_loadable(our_dir: Path, out_dir: Path) -> Path:
    """transformers has only the MLP projector; a linear W is the MLP with identity act and linear_2 = I."""
    cfg = json.loads((our_dir / "config.json").read_text())
    if cfg.get("projector_type") != "linear":
        return our_dir
    out_dir.mkdir()
    state = load_file(our_dir / "model.safetensors")
    hidden = cfg["text_config"]["hidden_size"]
    state["multi_modal_projector.linear_2.weight"] = torch.eye(hidden)
    state["multi_modal_projector.linear_2.bias"] = torch.zeros(hidden)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    cfg.update(projector_type="mlp2x_gelu", projector_hidden_act="linear")
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


def prompt(cfg, n_text: int, gen: torch.Generator, n_images: int = 1) -> list[int]:
    ids = [1]
    for _ in range(n_images):
        ids += [5] + [cfg.image_token_index] * cfg.image_seq_length
    return ids + torch.randint(3, cfg.image_token_index - 1, (n_text,), generator=gen).tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    cfg = tiny_config(**VARIANTS[request.param])
    root = tmp_path_factory.mktemp(request.param)
    ours = make_checkpoint(root / "ours", cfg, seed=hash(request.param) % 1000)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(hf_loadable(ours, root / "hf")).eval()
    return cfg, ours, hf


def test_logits_match_transformers(pair):
    cfg, ours_dir, hf = pair
    model = load_model(ours_dir)
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([prompt(cfg, 12, gen, n_images=2), prompt(cfg, 12, gen, n_images=2)])
    pixels = torch.randn(4, 3, 28, 28, generator=gen)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels)
        ref = hf(input_ids=ids, pixel_values=pixels).logits
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1.0  # weights large enough that a wrong layer would show
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    cfg, ours_dir, hf = pair
    engine = load_engine(ours_dir, block_size=8)
    gen = torch.Generator().manual_seed(2)
    for n_text in (3, 17):
        ids = prompt(cfg, n_text, gen)
        pixels = torch.randn(1, 3, 28, 28, generator=gen)
        ref = hf.generate(
            input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=32, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, len(ids):].tolist()
        request = GenerationRequest(ids, engine.encode_images(pixels.numpy()), SamplingParams(max_new_tokens=32))
        out = generate(engine, [request], eos_token_ids=set())[0]
        assert out.token_ids == ref
        assert out.finish_reason == "length"
    assert engine.num_free_blocks == engine.blocks.num_blocks


def test_transformers_checkpoint_loads_here(tmp_path):
    """A checkpoint written by transformers' save_pretrained (its own key layout) loads and agrees."""
    cfg = tiny_config(num_kv_heads=2)
    hf_cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**cfg.vision_config.to_dict()),
        text_config=transformers.LlamaConfig(**{k: v for k, v in cfg.text_config.to_dict().items() if k != "rope_theta"}),
        image_token_index=cfg.image_token_index, image_seq_length=cfg.image_seq_length,
    )
    torch.manual_seed(3)
    hf = transformers.LlavaForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    ids = torch.tensor([prompt(cfg, 9, torch.Generator().manual_seed(0))])
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixel_values=pixels), hf(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)
    # and back: ours re-saved loads in transformers with identical weights
    save_checkpoint(model, tmp_path / "ours")
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    for (name, a), b in zip(hf.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_checkpoint_round_trip(tmp_path):
    cfg = tiny_config()
    src = make_checkpoint(tmp_path / "single", cfg)
    model = load_model(src)
    save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = load_model(tmp_path / "sharded")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.tensor([prompt(cfg, 5, torch.Generator().manual_seed(0))])
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixel_values=pixels), hf(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)
