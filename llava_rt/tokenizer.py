"""Text side of the processor: tokenizer, chat template, `<image>` expansion, streaming detokenizer.

Reads the llava-hf layout with the `tokenizers` library and jinja2 only (no transformers, no
torch), and reproduces what transformers does with the same files:
- the tokenizer.json post-processor decides BOS/EOS (transformers 5 drops tokenizer_config's
  add_bos_token / add_eos_token whenever tokenizer.json exists);
- chat templates render in transformers' sandboxed jinja environment (utils/chat_template_utils.py);
- `<image>` expands to `image_seq_length` copies of `image_token_index`, as LlavaProcessor does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .image_processor import ProcessorError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"  # transformers 5 (tokenizer and processor)
CHAT_TEMPLATE_JSON = "chat_template.json"  # transformers 4 processors (llava-hf checkpoints)
GENERATION_CONFIG_FILE = "generation_config.json"

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The template shipped with llava-hf/llava-1.5-7b-hf (chat_template.json), verbatim. Note that it
# ends assistant turns with a space, not with </s>, and renders nothing for string content.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The default: LLaVA-1.5's own "vicuna_v1" conversation format,
#   "{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"
# It renders the same as LLAVA_HF_CHAT_TEMPLATE up to the first answer, but closes every answer
# with eos_token (inside {% generation %}, so training learns to stop) and accepts string content.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' ' }}{% endif %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% if not loop.last %}{{ ' ' }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Chat template rendering, mirroring transformers.utils.chat_template_utils


class _AssistantTracker(jinja2.ext.Extension):
    """The `{% generation %}` tag: records the character spans of assistant text while active."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        environment.extend(activate_tracker=self.activate_tracker)
        self._tracking: ContextVar = ContextVar("assistant_tracker", default=None)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context: Any, caller: Any) -> str:
        rv = caller()
        if (tracking := self._tracking.get()) is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(rv)))
        return rv

    @contextmanager
    def activate_tracker(self, blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Like transformers: namespaces refuse underscore names, closing a sandbox escape route.
    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore attributes ({name!r})")


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' doesn't.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_AssistantTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ProcessorError(
            f"the chat template does not parse (line {e.lineno}: {e.message}); fix the template"
        ) from None


def _plain(value: Any) -> Any:
    # Templates only see plain JSON-like data (transformers' _plain_template_data); images or
    # arrays in content blocks become inert placeholders such as "<Image>".
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy scalars
    return f"<{type(value).__name__}>"


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    return_assistant_spans: bool = False,
    **kwargs: Any,
) -> str | tuple[str, list[tuple[int, int]]]:
    """Render `messages` exactly as transformers' apply_chat_template(tokenize=False) does."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ProcessorError("a chat needs a non-empty list of messages like [{'role': 'user', 'content': '...'}]")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ProcessorError(f"each chat message must be a dict with 'role' and 'content', got {m!r:.80}")
    if template == DEFAULT_CHAT_TEMPLATE and not kwargs:
        fast = _render_default_template(messages, add_generation_prompt, (special_tokens or {}).get("eos_token", ""))
        if fast is not None:
            return fast if return_assistant_spans else fast[0]
    chat = []
    for m in messages:
        chat.append(_plain({k: v for k, v in m.items() if v is not None}))  # drop None keys, as transformers
    compiled = compile_chat_template(template)
    variables = {**(special_tokens or {}), **_plain(kwargs)}
    variables.update(
        messages=chat, tools=_plain(tools), documents=_plain(documents), add_generation_prompt=add_generation_prompt
    )
    try:
        if not return_assistant_spans:
            return compiled.render(**variables)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        with compiled.environment.activate_tracker(blocks, spans):
            for block in compiled.generate(**variables):
                blocks.append(block)
        return "".join(blocks), spans
    except jinja2.exceptions.TemplateError as e:
        raise ProcessorError(f"the chat template rejected the conversation: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # e.g. list content given to a template that concatenates strings
        raise ProcessorError(
            f"the chat template failed on these messages ({type(e).__name__}: {e}); "
            f"check the message format this model's template expects"
        ) from None


def _render_default_template(
    chat: list[dict[str, Any]], add_generation_prompt: bool, eos: str
) -> tuple[str, list[tuple[int, int]]] | None:
    """DEFAULT_CHAT_TEMPLATE in plain Python: the text and the {% generation %} spans jinja gives
    (tests/test_tokenizer.py compares them), several times faster, which counts where training
    tokenizes every turn of every sample. None unless every message has a str role and str or
    text/image-block content of plain types; jinja renders the rest (and raises what it raises)."""
    if type(eos) is not str:
        return None
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0

    def add(text: str, generation: bool = False) -> None:
        nonlocal length
        if generation:
            spans.append((length, length + len(text)))
        parts.append(text)
        length += len(text)

    for m in chat:
        role, content = m.get("role"), m.get("content")
        if type(role) is not str:
            return None
        if role != "system":
            add(role.upper() + ": ")
        if type(content) is str:
            add(content + eos, generation=True) if role == "assistant" else add(content + " ")
            continue
        if type(content) is not list or any(type(c) is not dict for c in content):
            return None
        kinds = [c.get("type") for c in content]
        texts = [c.get("text") for c, kind in zip(content, kinds) if kind == "text"]
        if any(k is not None and type(k) is not str for k in kinds) or any(type(t) is not str for t in texts):
            return None
        add("<image>\n" * kinds.count("image"))
        if role == "assistant":
            add(" ".join(texts) + eos, generation=True)
        else:
            add("".join(t + " " for t in texts))
    if add_generation_prompt:
        add("ASSISTANT:")
    return "".join(parts), spans


# ----------------------------------------------------------------------------------------------
# The text processor


def _token_str(v: Any) -> str | None:
    # tokenizer_config stores special tokens as strings or as serialized AddedToken dicts.
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessorError(f"{path} is not readable JSON ({e}); restore it from the original checkpoint") from None


def _find_chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    # transformers' precedence: chat_template.jinja, then a processor's chat_template.json,
    # then the tokenizer_config entry (a string, or a list of named templates).
    jinja_path = model_dir / CHAT_TEMPLATE_JINJA
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    json_path = model_dir / CHAT_TEMPLATE_JSON
    if json_path.is_file():
        d = _read_json(json_path)
        t = d.get("chat_template") if isinstance(d, dict) else None
        if isinstance(t, str):
            return t
        raise ProcessorError(f"{json_path} has no 'chat_template' string; fix the file or delete it")
    t = tok_config.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


@dataclass
class TextProcessor:
    tokenizer: Tokenizer
    image_token_index: int
    image_seq_length: int
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> string
    eos_token_ids: set[int] = field(default_factory=set)
    clean_up_tokenization_spaces: bool = False

    def __post_init__(self) -> None:
        # It must be an added token, so that text can never merge into or split it.
        added = self.tokenizer.get_added_tokens_decoder().get(self.image_token_index)
        token = added.content if added is not None else self.tokenizer.id_to_token(self.image_token_index)
        if added is None or self.tokenizer.encode(token, add_special_tokens=False).ids != [self.image_token_index]:
            raise ProcessorError(
                f"image_token_index {self.image_token_index} is not a single added token of the tokenizer "
                f"(token {token!r}); make config.json's image_token_index match the id of '<image>' in tokenizer.json"
            )
        if self.image_seq_length < 1:
            raise ProcessorError(f"image_seq_length must be >= 1, got {self.image_seq_length}")
        self.image_token = token

    @classmethod
    def load(cls, model_dir: str | os.PathLike, image_token_index: int, image_seq_length: int) -> TextProcessor:
        model_dir = Path(model_dir)
        tok_path = model_dir / TOKENIZER_FILE
        if not tok_path.is_file():
            raise ProcessorError(
                f"{tok_path} not found; the model directory needs the HF `tokenizers` file "
                f"(copy tokenizer.json from the checkpoint, or save it with tokenizer.save_pretrained)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises plain Exception for bad files
            raise ProcessorError(
                f"{tok_path} cannot be loaded ({e}); restore it from the original checkpoint"
            ) from None

        cfg_path = model_dir / TOKENIZER_CONFIG_FILE
        tok_config = _read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(tok_config, dict):
            raise ProcessorError(f"{cfg_path} must hold a JSON object")
        special = {n: s for n in SPECIAL_TOKEN_NAMES if (s := _token_str(tok_config.get(n)))}
        # transformers 5 reads special_tokens_map.json only for configs without added_tokens_decoder.
        map_path = model_dir / SPECIAL_TOKENS_MAP_FILE
        if map_path.is_file() and "added_tokens_decoder" not in tok_config:
            smap = _read_json(map_path)
            if isinstance(smap, dict):
                special.update({n: s for n in SPECIAL_TOKEN_NAMES if (s := _token_str(smap.get(n)))})

        eos_ids = set()
        if "eos_token" in special and (i := tokenizer.token_to_id(special["eos_token"])) is not None:
            eos_ids.add(i)
        gen_path = model_dir / GENERATION_CONFIG_FILE
        if gen_path.is_file():
            gen = _read_json(gen_path)
            e = gen.get("eos_token_id") if isinstance(gen, dict) else None
            eos_ids.update([e] if isinstance(e, int) else [x for x in (e or []) if isinstance(x, int)])

        return cls(
            tokenizer=tokenizer,
            image_token_index=image_token_index,
            image_seq_length=image_seq_length,
            chat_template=_find_chat_template(model_dir, tok_config) or DEFAULT_CHAT_TEMPLATE,
            special_tokens=special,
            eos_token_ids=eos_ids,
            clean_up_tokenization_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)),
        )

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens.get("pad_token")
        return self.tokenizer.token_to_id(pad) if pad else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for `messages` (OpenAI/transformers form; content a string or a list of
        {"type": "image"} / {"type": "text", "text": ...} blocks)."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.special_tokens, **kwargs)

    def _encoding(self, text: str) -> Any:
        # Like transformers' processor.apply_chat_template: no second BOS when the text has one.
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        return self.tokenizer.encode(text, add_special_tokens=add_special)

    def _expand(self, ids: list[int], num_images: int | None, what: str) -> list[int]:
        n = ids.count(self.image_token_index)
        if num_images is not None and n != num_images:
            raise ProcessorError(
                f"{what} has {n} {self.image_token} placeholder(s) but {num_images} image(s) were given; "
                f"put exactly one {self.image_token} (or one {{'type': 'image'}} content block) per image"
            )
        if n == 0:
            return ids
        out: list[int] = []
        for i in ids:
            if i == self.image_token_index:
                out.extend([i] * self.image_seq_length)
            else:
                out.append(i)
        return out

    def encode_prompt(self, text: str, num_images: int | None = None) -> list[int]:
        """Token ids for `text`, BOS as the tokenizer adds it, each image token expanded to
        image_seq_length slots. `num_images` (when given) must equal the number of image tokens."""
        return self._expand(self._encoding(text).ids, num_images, "the prompt")

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        num_images: int | None = None,
        return_assistant_mask: bool = False,
        **kwargs: Any,
    ) -> list[int] | tuple[list[int], list[int]]:
        """Render and encode a chat. With `return_assistant_mask`, also a 0/1 list marking the tokens
        inside the template's {% generation %} blocks (the assistant's answers: the training loss)."""
        if not return_assistant_mask:
            return self.encode_prompt(self.apply_chat_template(messages, add_generation_prompt, **kwargs), num_images)
        text, spans = render_chat_template(
            self.chat_template, messages, add_generation_prompt, self.special_tokens,
            return_assistant_spans=True, **kwargs,
        )
        if not spans:
            raise ProcessorError(
                "the chat template has no {% generation %} block, so assistant tokens cannot be masked; "
                "wrap assistant text in {% generation %}...{% endgeneration %}"
            )
        enc = self._encoding(text)
        # Same rule as transformers: a token is the assistant's if it overlaps a span.
        mask = [0] * len(enc.ids)
        k = 0
        for t, (start, end) in enumerate(enc.offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k == len(spans):
                break
            if end > spans[k][0]:
                mask[t] = 1
        ids = enc.ids
        expanded = self._expand(ids, num_images, "the chat")
        if len(expanded) != len(ids):
            n = self.image_seq_length
            mask = [m for i, m in zip(ids, mask) for _ in range(n if i == self.image_token_index else 1)]
        return expanded, mask

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers 5 skips this clean-up for BPE models (it corrupts their output).
        if self.clean_up_tokenization_spaces and type(self.tokenizer.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def streaming_detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces, one call per token.

    The prefix/read-offset method of TGI and vLLM: decode a short window of recent tokens and
    emit what it adds to the previous window, holding back while the text ends in U+FFFD (a
    multi-byte character still split across tokens). The pieces concatenate to decode(all ids),
    or to decode(all ids).lstrip() with `answer=True`: an answer's leading space is the separator
    after "ASSISTANT:", which the LLaVA repo strips too.
    """

    def __init__(self, processor: TextProcessor, skip_special_tokens: bool = True, answer: bool = False):
        self.processor = processor
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this are already emitted
        self.strip_leading = answer  # until the first non-space text is out

    def _emit(self, piece: str) -> str:
        if self.strip_leading:
            piece = piece.lstrip()
            self.strip_leading = not piece
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly completed text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return self._emit(piece)
        return ""

    def flush(self) -> str:
        """The text still held back at the end of the stream (a genuinely invalid byte sequence
        decodes to U+FFFD here, as it does in decode(all ids))."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._emit(new_text[len(prefix_text) :])


# ----------------------------------------------------------------------------------------------
# Building a tokenizer (trainer and tests; nothing is downloaded)


@dataclass(frozen=True)
class TokenizerIds:
    """What build_tokenizer_files made: the ids a model config needs."""

    image_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    unk_token_id: int
    vocab_size: int  # including <image>; at most the vocab_size asked for


def build_tokenizer_files(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    vocab_size: int,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> TokenizerIds:
    """Train a byte-level BPE on `texts` and write tokenizer.json, tokenizer_config.json,
    special_tokens_map.json and chat_template.jinja that transformers' AutoTokenizer loads.

    Layout, like llava-hf's Llama vocab: <unk>=0, <s>=1, </s>=2, <pad>=3, then the BPE vocab, and
    `<image>` appended last: id vocab_size - 1 when the texts give enough merges, lower otherwise
    (a small corpus runs out of merges), so take the ids from the result.
    """
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet) + 1:
        need = len(specials) + len(alphabet) + 1
        raise ProcessorError(f"vocab_size {vocab_size} is too small for a byte-level BPE; use at least {need}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    image_id = tok.token_to_id("<image>")
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_FILE))
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    added = {
        str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for s in [*specials, "<image>"]
    }
    config = {
        # PreTrainedTokenizerFast loads tokenizer.json as is in transformers 4 and 5.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,  # for transformers 4; 5 reads chat_template.jinja
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    smap = {**names, "additional_special_tokens": ["<image>"]}
    (out / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(smap, indent=2) + "\n", encoding="utf-8")
    (out / CHAT_TEMPLATE_JINJA).write_text(chat_template, encoding="utf-8")
    return TokenizerIds(
        image_token_id=image_id, bos_token_id=bos_id, eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"), unk_token_id=tok.token_to_id("<unk>"),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
    )
