"""Tokenizer, chat template and streaming detokenizer: parity with transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from llava_rt.image_processor import ProcessorError
from llava_rt.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    LLAVA_HF_CHAT_TEMPLATE,
    TextProcessor,
    _render_default_template,
    build_tokenizer_files,
    render_chat_template,
)

transformers = pytest.importorskip("transformers")

CORPUS = [
    "USER: <image>\nWhat is in the picture? ASSISTANT: A red circle on a blue square.</s>",
    "The quick brown fox jumps over the lazy dog. 你好世界 🦙🦙 llama emoji 🚀 rocket, café naïve",
    "日本語のテキストです。 Ünïcödé wörds and numbers 12345 67890\n\tindented line",
    "Describe the image briefly. A photo of two cats sleeping on a sofa.",
] * 20
VOCAB = 400
SEQ = 4  # image_seq_length used with a 28px crop, patch 14, CLS dropped


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    ids = build_tokenizer_files(d, CORPUS, VOCAB)
    assert (ids.image_token_id, ids.unk_token_id, ids.bos_token_id, ids.eos_token_id, ids.pad_token_id) == (
        VOCAB - 1, 0, 1, 2, 3
    )
    assert ids.vocab_size == VOCAB
    return d


@pytest.fixture(scope="module")
def tp(tok_dir):
    return TextProcessor.load(tok_dir, image_token_index=VOCAB - 1, image_seq_length=SEQ)


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


TEXTS = [
    "hello <image> world</s>",
    "USER: <image>\nWhat is this? ASSISTANT:",
    "  leading spaces\n\nnewlines\t tab  ",
    "🦙你好 café — ½ ∑ 𝔘",
    "<s>USER: already has a BOS",
    "<image><image>back to back<pad>",
    "",
]

CHATS = {
    "single-turn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]},
    ],
    "text-only": [
        {"role": "user", "content": [{"type": "text", "text": "Tell me a joke."}]},
    ],
    "system": [
        {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is in the image?"}, {"type": "image"}]},
    ],
    "multi-turn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A llama 🦙."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "White, with brown 斑点."}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ],
    "string-content": [
        {"role": "system", "content": "A chat between a curious user and an assistant."},
        {"role": "user", "content": "<image>\nDescribe it."},
        {"role": "assistant", "content": "Two cats on a sofa."},
        {"role": "user", "content": "And now?"},
    ],
}


def test_token_ids_match_transformers(tp, hf):
    for text in TEXTS:
        assert tp.tokenizer.encode(text).ids == hf(text)["input_ids"], text
        assert tp.tokenizer.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_and_eos(tok_dir, tp, hf):
    assert tp.bos_token == hf.bos_token == "<s>"
    assert tp.eos_token_ids == {hf.eos_token_id}
    assert tp.pad_token_id == hf.pad_token_id
    assert hf.convert_tokens_to_ids("<image>") == VOCAB - 1
    # generation_config.json's eos ids join the set.
    d = tok_dir.parent / "with_gen"
    shutil.copytree(tok_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert TextProcessor.load(d, VOCAB - 1, SEQ).eos_token_ids == {2, 3}


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, LLAVA_HF_CHAT_TEMPLATE], ids=["default", "llava-hf"])
@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_template_matches_transformers(tp, hf, template, chat):
    messages = CHATS[chat]
    for gen in (True, False):
        ours = render_chat_template(template, messages, gen, tp.special_tokens)
        theirs = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    # The default template is the one the files carry.
    if template == DEFAULT_CHAT_TEMPLATE:
        assert tp.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_default_template_is_llava_v1_format(tp):
    text = tp.apply_chat_template(CHATS["multi-turn"])
    assert text == (
        "USER: <image>\nWhat animal is this? ASSISTANT: A llama 🦙.</s>USER: What colour is it? "
        "ASSISTANT: White, with brown 斑点.</s>USER: Thanks! ASSISTANT:"
    )
    # Single turn: identical to what llava-hf's own template renders.
    single = CHATS["single-turn"]
    assert tp.apply_chat_template(single) == render_chat_template(LLAVA_HF_CHAT_TEMPLATE, single, True, tp.special_tokens)
    assert tp.apply_chat_template(single) == "USER: <image>\nWhat is shown here? ASSISTANT:"


def test_template_features_match_transformers(tp, hf):
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ m | tojson }}{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}"
        "{{ ns.n }}{{ bos_token }}{{ extra }}{{ dict(a=1) | tojson }}{{ strftime_now('%Y')[:2] }}"
    )
    messages = [{"role": "user", "content": "<b>&'\"é", "ignored": None}]
    ours = render_chat_template(template, messages, True, tp.special_tokens, extra="X")
    assert ours == hf.apply_chat_template(messages, chat_template=template, tokenize=False, extra="X")
    with pytest.raises(ProcessorError, match="rejected the conversation: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", messages, True, {})
    with pytest.raises(ProcessorError, match="does not parse"):
        render_chat_template("{% for %}", messages, True, {})
    with pytest.raises(ProcessorError, match="failed on these messages"):
        render_chat_template("{{ messages[0]['content'] + ' ' }}", CHATS["text-only"], True, {})
    with pytest.raises(ProcessorError, match="non-empty list of messages"):
        tp.apply_chat_template([])


def _jinja_render(messages, gen, special, spans):
    # The same template text, one character longer, is not the fast path's: jinja renders it.
    return render_chat_template(DEFAULT_CHAT_TEMPLATE + "{{ '' }}", messages, gen, special,
                                return_assistant_spans=spans)


def test_default_template_fast_path_equals_jinja():
    rng = np.random.default_rng(0)
    words = ["What", "colour?", "A llama 🦙.", "", " spaced ", "<image>", "x\ny", "</s>", "斑点"]
    roles = ["user", "assistant", "system", "tool"]

    def block():
        kind = rng.choice(["image", "text", "text", "video", None])
        b = {} if kind is None else {"type": str(kind)}
        if kind == "text" or rng.random() < 0.1:
            b["text"] = " ".join(rng.choice(words, size=rng.integers(0, 4)))
        return b

    fast_renders = 0
    for trial in range(300):
        messages = []
        for _ in range(rng.integers(1, 7)):
            role = str(rng.choice(roles))
            content = (" ".join(rng.choice(words, size=rng.integers(0, 4))) if rng.random() < 0.4
                       else [block() for _ in range(rng.integers(0, 4))])
            messages.append({"role": role, "content": content})
        special = {} if trial % 7 == 0 else {"eos_token": "</s>", "bos_token": "<s>"}
        fast_renders += _render_default_template(messages, True, special.get("eos_token", "")) is not None
        for gen in (True, False):
            for spans in (True, False):
                assert render_chat_template(DEFAULT_CHAT_TEMPLATE, messages, gen, special,
                                            return_assistant_spans=spans) == _jinja_render(messages, gen, special, spans)
    assert fast_renders == 300  # every random chat above is one the fast path takes
    # What the fast path leaves to jinja still renders (or fails) as jinja does.
    odd = [{"role": "user", "content": [{"type": "text", "text": 3}]}]
    assert _render_default_template(odd, True, "") is None
    with pytest.raises(ProcessorError):
        render_chat_template(DEFAULT_CHAT_TEMPLATE, odd, True, {})
    none_eos = [{"role": "assistant", "content": "hi"}]
    assert render_chat_template(DEFAULT_CHAT_TEMPLATE, none_eos, False, {"eos_token": None}) == "ASSISTANT: hiNone"


def test_assistant_mask_matches_transformers(tp, hf):
    messages = CHATS["multi-turn"]
    ids, mask = tp.encode_chat(messages, add_generation_prompt=False, return_assistant_mask=True)
    out = hf.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, add_generation_prompt=False
    )
    # transformers' tokenizer path adds no BOS and no image expansion; compare on that form.
    n_img = SEQ - 1
    i = ids.index(VOCAB - 1)
    squeezed_ids = ids[1 : i + 1] + ids[i + 1 + n_img :]
    squeezed_mask = mask[1 : i + 1] + mask[i + 1 + n_img :]
    assert squeezed_ids == out["input_ids"]
    assert squeezed_mask == out["assistant_masks"]
    answer = tp.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    # (a lone space token before an answer lies outside the span, as in transformers)
    assert [a.strip() for a in answer.split("</s>")] == ["A llama 🦙.", "White, with brown 斑点.", ""]


def test_image_expansion_matches_llava_processor(tp, hf):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=hf, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    img = Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8))
    for chat in ("single-turn", "multi-turn", "system"):
        prompt = tp.apply_chat_template(CHATS[chat])
        want = proc(text=prompt, images=[img], return_tensors="np")["input_ids"][0].tolist()
        got = tp.encode_prompt(prompt, num_images=1)
        assert got == want
        assert got.count(VOCAB - 1) == SEQ
        assert tp.encode_chat(CHATS[chat], num_images=1) == want
    two = "USER: <image>\n<image>\nCompare. ASSISTANT:"
    want = proc(text=two, images=[img, img], return_tensors="np")["input_ids"][0].tolist()
    assert tp.encode_prompt(two, num_images=2) == want and want.count(VOCAB - 1) == 2 * SEQ
    # A prompt that already starts with BOS gets no second one (like processor.apply_chat_template).
    assert tp.encode_prompt("<s>USER: hi ASSISTANT:") == tp.encode_prompt("USER: hi ASSISTANT:")


def test_image_count_mismatch(tp):
    with pytest.raises(ProcessorError, match=r"has 1 <image> placeholder\(s\) but 2 image\(s\)"):
        tp.encode_prompt("USER: <image>\nHi ASSISTANT:", num_images=2)
    with pytest.raises(ProcessorError, match=r"has 0 <image> placeholder\(s\) but 1 image\(s\)"):
        tp.encode_chat(CHATS["text-only"], num_images=1)
    assert VOCAB - 1 not in tp.encode_prompt("no image here", num_images=0)


def test_decode_matches_transformers(tp, hf):
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        for skip in (True, False):
            assert tp.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def _stream(tp, ids, skip=True):
    det = tp.streaming_detokenizer(skip_special_tokens=skip)
    pieces = [det.add(i) for i in ids]
    return pieces, det.flush()


def test_streaming_detokenizer_multibyte(tp):
    text = "Llamas 🦙🦙 live in 秘鲁 and 日本語のテキスト; rockets 🚀 fly. Ünïcödé naïve café 𝔘𝔫𝔦"
    ids = tp.tokenizer.encode(text, add_special_tokens=False).ids + [tp.tokenizer.token_to_id("</s>")]
    # The test only means something if some tokens end inside a character.
    partial = [i for i in range(1, len(ids)) if tp.decode(ids[:i]).endswith("\ufffd")]
    assert partial, "corpus gave no token that splits a multi-byte character"
    for skip in (True, False):
        pieces, tail = _stream(tp, ids, skip)
        assert not any("\ufffd" in p for p in pieces)
        assert "".join(pieces) + tail == tp.decode(ids, skip_special_tokens=skip)
        assert tail == ""
        # Nothing is emitted while a character is incomplete.
        assert all(pieces[i - 1] == "" or not tp.decode(ids[:i]).endswith("\ufffd") for i in partial)


def test_streaming_detokenizer_random_ids(tp):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, VOCAB, 40).tolist()
        pieces, tail = _stream(tp, ids)
        assert "".join(pieces) + tail == tp.decode(ids)


def test_streaming_detokenizer_answer_drops_only_the_leading_space(tp):
    from llava_rt.tokenizer import StreamingDetokenizer

    rng = np.random.default_rng(1)
    space = tp.tokenizer.encode(" ", add_special_tokens=False).ids
    for text in ("  The circle is red.  ", " 🦙 ok", "no space"):
        for ids in (space + tp.tokenizer.encode(text, add_special_tokens=False).ids, rng.integers(0, VOCAB, 30).tolist()):
            det = StreamingDetokenizer(tp, answer=True)
            pieces = [det.add(i) for i in ids] + [det.flush()]
            assert "".join(pieces) == tp.decode(ids).lstrip()
            assert "".join(pieces).endswith(tp.decode(ids).lstrip()[-3:])  # trailing spaces kept


def test_chat_template_sources(tok_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tok_dir, d)
    # chat_template.jinja wins, then a processor's chat_template.json, then tokenizer_config, then the default.
    (d / "chat_template.jinja").write_text("JINJA")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
    assert TextProcessor.load(d, VOCAB - 1, SEQ).chat_template == "JINJA"
    (d / "chat_template.jinja").unlink()
    assert TextProcessor.load(d, VOCAB - 1, SEQ).chat_template == "JSON"
    (d / "chat_template.json").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "NAMED"}, {"name": "tool_use", "template": "T"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert TextProcessor.load(d, VOCAB - 1, SEQ).chat_template == "NAMED"
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert TextProcessor.load(d, VOCAB - 1, SEQ).chat_template == DEFAULT_CHAT_TEMPLATE


def test_load_errors(tok_dir, tmp_path):
    with pytest.raises(ProcessorError, match=r"tokenizer\.json not found"):
        TextProcessor.load(tmp_path, VOCAB - 1, SEQ)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ProcessorError, match=r"tokenizer\.json cannot be loaded"):
        TextProcessor.load(tmp_path, VOCAB - 1, SEQ)
    with pytest.raises(ProcessorError, match="image_token_index 7 is not a single added token"):
        TextProcessor.load(tok_dir, 7, SEQ)
    d = tmp_path / "badcfg"
    shutil.copytree(tok_dir, d)
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ProcessorError, match=r"tokenizer_config\.json is not readable JSON"):
        TextProcessor.load(d, VOCAB - 1, SEQ)


def test_build_small_corpus_and_tiny_vocab(tmp_path):
    # Too few merges available: <image> still comes last, below the requested size.
    ids = build_tokenizer_files(tmp_path / "small", ["a b c"], 1000)
    assert ids.image_token_id == ids.vocab_size - 1 < 999
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "small")
    assert hf.convert_tokens_to_ids("<image>") == ids.image_token_id
    with pytest.raises(ProcessorError, match="vocab_size 100 is too small"):
        build_tokenizer_files(tmp_path, CORPUS, 100)
