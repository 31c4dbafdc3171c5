"""Text <-> token ids for a model, built from a GGUF file's metadata or a Hugging Face folder."""

from __future__ import annotations

import json
import logging
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from tokenwire.engine.chat_template import ChatTemplate, Message
from tokenwire.engine.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# Token texts that end a turn or a document in the chat formats in use (llama.cpp keeps the same
# list). A chat model stops on these too, whatever its configured EOS is.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<end_of_utterance>",
    "<|return|>",
    "<|call|>",
)

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_TYPE_UNKNOWN = 2
_TYPE_CONTROL = 3
_TYPE_USER_DEFINED = 4

# Pre-tokenizer split patterns, as the original tokenizer.json files spell them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class _PreTokenizerSpec:
    """How one family of byte-level BPE vocabularies cuts text before merging.

    Attributes:
        splits: regexes applied one after the other, each cutting the previous pieces further.
        ignore_merges: a piece that is itself a vocabulary token is taken whole.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False


_DEFAULT = _PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = _PreTokenizerSpec((_GPT2_SPLIT,))
_STARCODER = _PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT))  # digits one by one
_LLAMA3 = _PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True)
_LLAMA3_MERGING = _PreTokenizerSpec((_LLAMA3_SPLIT,))
_QWEN2 = _PreTokenizerSpec((_QWEN2_SPLIT,))
_TEKKEN = _PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True)
_GPT4O = _PreTokenizerSpec((_GPT4O_SPLIT,))
_FALCON = _PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"))
_BLOOM = _PreTokenizerSpec((_BLOOM_SPLIT,))
_VIKING = _PreTokenizerSpec((_BLOOM_SPLIT, r"\p{N}"))

# `tokenizer.ggml.pre` names -> how to pre-tokenize, following llama.cpp's table.
_PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        ("gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "jina-v1-en", "jina-v2-code",
         "roberta-bpe", "gigachat", "mpt", "olmo", "jais", "trillion", "exaone4", "granite-docling",
         "mellum", "a.x-4.0", "modern-bert"),
        _GPT2,
    ),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), _STARCODER
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), _LLAMA3_MERGING),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"), _QWEN2
    ),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "falcon": _FALCON,
    **dict.fromkeys(("bloom", "poro-chat", "gpt3-finnish"), _BLOOM),
    "viking": _VIKING,
}


class Tokenizer:
    """A model's tokenizer and chat template, on Hugging Face `tokenizers`.

    Build one with `from_gguf` or `from_hf_dir`; the constructor takes a ready backend.

    Args:
        backend: the `tokenizers.Tokenizer`; its post-processor decides which special tokens
            ``encode(..., add_special_tokens=True)`` adds.
        bos_token_id: the model's BOS token, or None if it has none.
        eos_token_ids: the configured end-of-sequence tokens, most important first.
        chat_template: the Jinja2 chat template text, or None.
        vocab_size: rows of the model's vocabulary; defaults to the backend's size.

    Raises:
        ValueError: a token id is outside the vocabulary, or the chat template does not compile.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True) if vocab_size is None else vocab_size
        if self._vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self._vocab_size}")
        named_ids = [("bos_token_id", bos_token_id), *(("eos_token_ids", i) for i in eos_token_ids)]
        for name, token_id in named_ids:
            if token_id is not None and not 0 <= token_id < self._vocab_size:
                raise ValueError(f"{name} has id {token_id}, outside the vocabulary of {self._vocab_size}")
        self._bos_token_id = bos_token_id
        self._chat_template = ChatTemplate(chat_template) if chat_template else None
        special = {token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special}
        eos = list(eos_token_ids)
        if self._chat_template is not None:
            # NOTE: chat models end a turn with a token the configuration often does not call EOS
            # (SmolLM2 ends turns with <|im_end|> but documents with <|endoftext|>); generation must
            # stop on either.
            for text in END_OF_TURN_TOKENS:
                token_id = backend.token_to_id(text)
                if token_id is not None and token_id in special:
                    eos.append(token_id)
        self._eos_token_ids = list(dict.fromkeys(eos))
        ids = [i for i in (bos_token_id, *self._eos_token_ids) if i is not None]
        self._all_special_ids = sorted(special.union(ids))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], *, reader: gguf.GGUFReader | None = None) -> Tokenizer:
        """The tokenizer a GGUF file describes in its ``tokenizer.*`` metadata.

        Args:
            path: the GGUF file.
            reader: an open `gguf.GGUFReader` of that file, to avoid parsing it twice.

        Raises:
            ModelLoadError: the file cannot be read, lacks a vocabulary, or uses a tokenizer model
                or pre-tokenizer this module does not know.
        """
        try:
            if reader is None:
                import gguf

                reader = gguf.GGUFReader(path)
            meta = _GGUFMetadata(reader)
            return _tokenizer_from_gguf_metadata(meta)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path}: cannot read the tokenizer: {exc}") from exc

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of a Hugging Face model folder.

        Reads ``tokenizer.json``, ``tokenizer_config.json`` (BOS/EOS, ``add_bos_token``,
        ``add_eos_token``, ``chat_template``), ``chat_template.jinja`` and ``generation_config.json``
        (more EOS ids) where present.

        Args:
            path: the folder.

        Raises:
            ModelLoadError: ``tokenizer.json`` is missing or a file is not valid.
        """
        folder = Path(path)
        try:
            return _tokenizer_from_hf_dir(folder)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{folder}: {exc}") from exc
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(f"{folder}: cannot read the tokenizer: {exc}") from exc

    # -- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (valid ids are ``0 .. vocab_size - 1``)."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        """The BOS token's id, or None."""
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end generation: the configured EOS, then a chat model's end-of-turn tokens."""
        return list(self._eos_token_ids)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of all special tokens (control tokens, BOS, EOS), ascending."""
        return list(self._all_special_ids)

    @property
    def has_chat_template(self) -> bool:
        """Whether the model has a chat template (`apply_chat_template` works)."""
        return self._chat_template is not None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    # -- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text.

        Special tokens written in the text (``<|im_start|>``) become their ids.

        Args:
            text: the text.
            add_special_tokens: add the BOS/EOS the model's configuration asks for.

        Raises:
            InvalidRequestError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids.

        Args:
            ids: token ids.
            skip_special_tokens: leave special tokens out of the text.

        Raises:
            InvalidRequestError: an id is not an integer in ``[0, vocab_size)``.
        """
        ids = self._check_ids(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of token ids, as the vocabulary spells them (``Ġthe`` for " the").

        Raises:
            InvalidRequestError: an id is not an integer in ``[0, vocab_size)``.
        """
        return [self._backend.id_to_token(token_id) or "" for token_id in self._check_ids(ids)]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        checked: list[int] = []
        for token_id in ids:
            try:
                # NOTE: operator.index also takes numpy and torch integers, and refuses floats.
                value = operator.index(token_id)
            except TypeError:
                raise InvalidRequestError(f"token id {token_id!r} is not an integer") from None
            if not 0 <= value < self._vocab_size:
                raise InvalidRequestError(
                    f"token id {value} is outside the vocabulary (0..{self._vocab_size - 1})"
                )
            checked.append(value)
        return checked

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, rendered with the model's chat template.

        Args:
            messages: ``{"role", "content"}`` dicts or objects with those attributes, oldest first.
            add_generation_prompt: end with the header that opens the assistant's turn.

        Raises:
            InvalidRequestError: the model has no chat template, a message is malformed, or the
                template rejects the conversation.
        """
        if self._chat_template is None:
            raise InvalidRequestError("the model has no chat template; send a plain text prompt instead")
        return self._chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self._bos_token_id),
            eos_token=self._token_text(self._eos_token_ids[0] if self._eos_token_ids else None),
        )

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation: `apply_chat_template`, then `encode` without added BOS/EOS.

        Raises:
            InvalidRequestError: as `apply_chat_template`.
        """
        # NOTE: the template writes the special tokens it wants (BOS included); adding them again
        # would double them.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._backend.id_to_token(token_id) or ""


# -- GGUF -------------------------------------------------------------------------------------


class _GGUFMetadata:
    """Typed reads of a GGUF file's key-value metadata."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._fields = reader.fields

    def scalar(self, key: str, default: Any = None) -> Any:
        import gguf

        field = self._fields.get(key)
        if field is None:
            return default
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        return field.parts[field.data[0]][0].item()

    def array(self, key: str) -> list[Any] | None:
        import gguf
        import numpy as np

        field = self._fields.get(key)
        if field is None:
            return None
        if field.types[0] != gguf.GGUFValueType.ARRAY:
            raise ValueError(f"{key} is not an array")
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()


def _tokenizer_from_gguf_metadata(meta: _GGUFMetadata) -> Tokenizer:
    tokens = meta.array("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("no tokenizer.ggml.tokens in the file")
    types = meta.array("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(f"{len(types)} token types for {len(tokens)} tokens")
    kind = meta.scalar("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, types, meta)
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, types, meta)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise ModelLoadError(f"tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")

    # Control tokens are special (skipped when decoding); user-defined ones are matched whole in
    # the text, as llama.cpp does, but decoded like text.
    special = [t for t, k in zip(tokens, types) if k in (_TYPE_CONTROL, _TYPE_UNKNOWN)]
    user_defined = [t for t, k in zip(tokens, types) if k == _TYPE_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    bos_id = meta.scalar("tokenizer.ggml.bos_token_id")
    eos_ids = [meta.scalar(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    _set_bos_eos(
        backend,
        bos_id if meta.scalar("tokenizer.ggml.add_bos_token", add_bos_default) else None,
        eos_ids[0] if meta.scalar("tokenizer.ggml.add_eos_token", False) else None,
    )
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=[i for i in eos_ids if i is not None],
        chat_template=meta.scalar("tokenizer.chat_template"),
        vocab_size=len(tokens),
    )


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    # NOTE: a few files repeat a token text (padding entries); the first id keeps it.
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _byte_level_bpe(tokens: list[str], types: list[int], meta: _GGUFMetadata) -> tokenizers.Tokenizer:
    """GPT-2 style BPE over bytes, cut into pieces the way ``tokenizer.ggml.pre`` names."""
    pre_name = meta.scalar("tokenizer.ggml.pre")
    if pre_name is None:
        logger.warning("GGUF file names no pre-tokenizer (tokenizer.ggml.pre); using llama.cpp's default")
        pre_name = "default"
    spec = _PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        raise ModelLoadError(
            f"pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
            f"known: {sorted(_PRE_TOKENIZERS)}"
        )
    merges = meta.array("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError("a byte-level BPE vocabulary needs tokenizer.ggml.merges")
    byte_char = _bytes_to_unicode()
    alphabet = set(byte_char.values())
    spelled = [
        # NOTE: some converters store plain tokens as raw UTF-8 instead of the byte alphabet; the
        # BPE model only ever sees byte-alphabet text, so spell those the way it will look them up.
        t if k != 1 or set(t) <= alphabet else "".join(byte_char[b] for b in t.encode("utf-8"))
        for t, k in zip(tokens, types)
    ]
    backend = tokenizers.Tokenizer(
        _bpe_model(vocab=_vocab(spelled), merges=_merge_pairs(merges), ignore_merges=spec.ignore_merges)
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    """``"a b"`` merge strings as ``("a", "b")`` pairs."""
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise ModelLoadError(f"merge {bad!r} in tokenizer.ggml.merges is not two tokens")
    return pairs  # type: ignore[return-value]


def _bpe_model(**kwargs: Any) -> models.BPE:
    try:
        return models.BPE(**kwargs)
    except Exception as exc:  # NOTE: tokenizers raises a bare Exception for inconsistent merges
        raise ModelLoadError(f"the vocabulary and merges do not fit together: {exc}") from exc


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte value (the ByteLevel alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: _GGUFMetadata) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE (LLaMA 1/2, Mistral): ``▁`` for spaces, bytes as ``<0xNN>`` fallback."""
    vocab = _vocab(tokens)
    merges = meta.array("tokenizer.ggml.merges")
    if merges is not None:
        pairs = _merge_pairs(merges)
    else:
        scores = meta.array("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelLoadError("a SentencePiece vocabulary needs tokenizer.ggml.merges or tokenizer.ggml.scores")
        pairs = _merges_from_scores(tokens, scores, vocab)
    unk_id = meta.scalar("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(
        _bpe_model(
            vocab=vocab,
            merges=pairs,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_space_prefix = bool(meta.scalar("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best-scored result first (SentencePiece merges the pair whose result scores highest)."""
    ranked: list[tuple[float, str, str]] = []
    for token, score in zip(tokens, scores):
        local = [
            (score, token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[1]], vocab[m[2]]))
        ranked.extend(local)
    # NOTE: sorted() is stable, so equal keys keep the vocabulary order above.
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _set_bos_eos(backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None) -> None:
    """Make ``encode(..., add_special_tokens=True)`` add BOS and/or EOS (None: that one is not added)."""
    prefix = [(backend.id_to_token(bos_id), bos_id)] if bos_id is not None else []
    suffix = [(backend.id_to_token(eos_id), eos_id)] if eos_id is not None else []
    if not prefix and not suffix:
        backend.post_processor = None
        return
    single = " ".join([*(f"{t}:0" for t, _ in prefix), "$A:0", *(f"{t}:0" for t, _ in suffix)])
    pair = " ".join([single, *(f"{t}:1" for t, _ in prefix), "$B:1", *(f"{t}:1" for t, _ in suffix)])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(prefix + suffix))
    )


# -- Hugging Face folder ----------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} is not a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_text(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the one named "default" is the chat one.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _tokenizer_from_hf_dir(folder: Path) -> Tokenizer:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelLoadError("no tokenizer.json in the folder")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # NOTE: tokenizers raises a bare Exception for a bad file
        raise ModelLoadError(f"tokenizer.json is not valid: {exc}") from exc
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")

    def token_id(key: str) -> int | None:
        text = _token_content(config.get(key))
        return backend.token_to_id(text) if text is not None else None

    bos_id = token_id("bos_token")
    if bos_id is None and isinstance(generation.get("bos_token_id"), int):
        bos_id = generation["bos_token_id"]
    eos_ids = [i for i in [token_id("eos_token")] if i is not None]
    generation_eos = generation.get("eos_token_id")
    eos_ids += [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])

    # NOTE: tokenizer.json's post-processor already adds what the model wants; an explicit
    # add_bos_token/add_eos_token in tokenizer_config.json overrides it.
    if "add_bos_token" in config or "add_eos_token" in config:
        _set_bos_eos(
            backend,
            bos_id if config.get("add_bos_token") else None,
            (eos_ids[0] if eos_ids else None) if config.get("add_eos_token") else None,
        )
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        chat_template=_chat_template_text(folder, config),
    )
