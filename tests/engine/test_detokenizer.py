"""Tests for the incremental detokenizer: deltas add up to the decoded text, stop strings, finish()."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models

from tokenwire.engine.detokenizer import REPLACEMENT_CHAR, DetokenizerUpdate, IncrementalDetokenizer, TokenDecoder
from tokenwire.engine.tokenizer import Tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It was not amused, and said so twice!",
    "accented": "Crème brûlée, façade, naïve coöperation; Ærøskøbing and Łódź in señor Müller's café.",
    "chinese": "我们今天去公园散步，天气非常好。机器学习模型可以生成文本。",
    "emoji": "Party 🎉🎉 time 👩‍👩‍👧‍👦 with 🇯🇵 flags and 🧑🏽‍🚀 astronauts 😀!",
    "mixed": "Hello 世界! Ça va? 🙂 Καλημέρα κόσμε — привет мир.\n\tCode: `x = 1 + 2`",
}


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    """The default model's own tokenizer (byte-level BPE from the GGUF file), loaded once."""
    return Tokenizer.from_gguf(default_model_path)


class CountingDecoder:
    """Wraps a tokenizer and records how many ids each decode call got."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.call_sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode through the wrapped tokenizer, recording the call's size."""
        self.call_sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def chunked(ids: Sequence[int], rng: random.Random | None) -> list[list[int]]:
    """Split ids into one-token chunks, or random chunks of 1 to 4 tokens when rng is given."""
    chunks: list[list[int]] = []
    i = 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, 4)
        chunks.append(list(ids[i : i + n]))
        i += n
    return chunks


def stream(
    tok: TokenDecoder,
    ids: Sequence[int],
    stop: Sequence[str] = (),
    skip_special_tokens: bool = True,
    rng: random.Random | None = None,
) -> tuple[list[DetokenizerUpdate], str, IncrementalDetokenizer]:
    """Feed ids to a fresh detokenizer the way the engine does; return the updates, finish() and it."""
    detok = IncrementalDetokenizer(tok, [1, 2, 3], stop, skip_special_tokens)
    updates = []
    for chunk in chunked(ids, rng):
        update = detok.add_tokens(chunk)
        updates.append(update)
        if update.stopped:
            break
    return updates, detok.finish(), detok


def joined(updates: list[DetokenizerUpdate], tail: str) -> str:
    """All streamed text: the deltas and the finish() text."""
    return "".join(u.text for u in updates) + tail


# --- the invariant -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("random_chunks", [False, True])
def test_deltas_add_up_to_decoded_text_without_partial_characters(
    tokenizer: Tokenizer, name: str, random_chunks: bool
) -> None:
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    updates, tail, detok = stream(tokenizer, ids, rng=random.Random(name) if random_chunks else None)
    assert joined(updates, tail) == tokenizer.decode(ids) == TEXTS[name]
    assert detok.text == TEXTS[name]
    assert all(REPLACEMENT_CHAR not in u.text for u in updates)
    assert tail == ""  # every character was complete, so nothing was left to flush


@pytest.mark.parametrize("name", ["chinese", "emoji"])
def test_multibyte_texts_do_split_characters_across_tokens(tokenizer: Tokenizer, name: str) -> None:
    # Guards the test above: these texts must contain tokens that hold part of a character only.
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_invariant_holds_for_random_token_sequences(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(1234)
    for _ in range(60):
        # Mix ordinary tokens with single-byte tokens (ids below 260 are mostly lone bytes) and
        # special tokens, which produce invalid and split UTF-8 as often as possible.
        ids = [rng.choice((rng.randrange(tokenizer.vocab_size), rng.randrange(260), rng.randrange(3)))
               for _ in range(rng.randint(1, 40))]
        updates, tail, _ = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens, rng=rng)
        assert joined(updates, tail) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_short_window(tokenizer: Tokenizer) -> None:
    decoder = CountingDecoder(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS.values()) * 8, add_special_tokens=False)
    updates, tail, _ = stream(decoder, ids)
    assert joined(updates, tail) == tokenizer.decode(ids)
    assert len(ids) > 500
    assert max(decoder.call_sizes) <= 8  # O(new tokens) per step, not O(tokens so far)


def test_context_dependent_decoding_keeps_sentencepiece_spaces() -> None:
    # A SentencePiece-style decoder drops the leading space of the first token it decodes, so
    # decoding each new token alone would lose the spaces between words.
    vocab = {"▁Hello": 0, "▁world": 1, "!": 2, "<unk>": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens([AddedToken("<s>", special=True)])
    ids = [0, 1, 4, 1, 2]
    updates, tail, _ = stream(backend, ids)
    assert [u.text for u in updates] == ["Hello", " world", "", " world", "!"]
    assert joined(updates, tail) == backend.decode(ids) == "Hello world world!"


# --- special tokens and finish() ---------------------------------------------------------------


def test_special_tokens_are_skipped_or_kept(tokenizer: Tokenizer) -> None:
    im_end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and im_end[0] in tokenizer.all_special_ids
    hi, there = (tokenizer.encode(text, add_special_tokens=False) for text in ("Hi", " there"))
    ids = hi + im_end + there
    skipped, tail_skipped, _ = stream(tokenizer, ids, skip_special_tokens=True)
    kept, tail_kept, _ = stream(tokenizer, ids, skip_special_tokens=False)
    assert joined(skipped, tail_skipped) == "Hi there"
    assert joined(kept, tail_kept) == "Hi<|im_end|> there"


def test_finish_decodes_a_trailing_incomplete_character_as_the_tokenizer_does(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT_CHAR))
    updates, tail, detok = stream(tokenizer, ids[:cut])
    assert all(REPLACEMENT_CHAR not in u.text for u in updates)
    assert tail.endswith(REPLACEMENT_CHAR)
    assert joined(updates, tail) == tokenizer.decode(ids[:cut])
    assert detok.finish() == ""  # a second finish has nothing left


# --- stop strings ------------------------------------------------------------------------------


def test_stop_string_split_across_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world. END here", add_special_tokens=False)
    assert not any("d. EN" in tokenizer.decode([t]) for t in ids)  # it spans several tokens
    updates, tail, detok = stream(tokenizer, ids, stop=["d. EN"])
    assert updates[-1].stopped and updates[-1].stop_string == "d. EN"
    assert joined(updates, tail) == "Hello worl"
    assert detok.text == "Hello worl" and detok.stopped and detok.stop_string == "d. EN"
    assert tail == ""
    assert len(updates) < len(ids)  # it stopped as soon as the stop string was complete


def test_stop_string_prefix_is_never_streamed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world. END here", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], ["d. EN"])
    seen: list[str] = []
    for t in ids:
        update = detok.add_tokens([t])
        seen.append(detok.text)
        if update.stopped:
            break
    # After " world" the "d" is held back: it could be the start of the stop string.
    assert "Hello worl" in seen
    assert not any(s.endswith(("d", "d.", "d. ", "d. E")) for s in seen)


def test_stop_string_at_the_very_start(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    updates, tail, detok = stream(tokenizer, ids, stop=["Hello"])
    assert len(updates) == 1
    assert updates[0] == DetokenizerUpdate("", stopped=True, stop_string="Hello")
    assert tail == "" and detok.text == ""


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    updates, _, detok = stream(tokenizer, ids, stop=["delta", "gam", "beta gamma"])
    assert detok.text == "alpha "
    assert updates[-1].stop_string == "beta gamma"


def test_stop_strings_on_real_texts_cut_at_the_first_occurrence(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    for text in TEXTS.values():
        ids = tokenizer.encode(text * 2, add_special_tokens=False)
        full = tokenizer.decode(ids)
        for _ in range(8):
            start = rng.randrange(len(text) - 3)
            stop = text[start : start + rng.randint(1, 6)]
            updates, tail, detok = stream(tokenizer, ids, stop=[stop], rng=rng)
            assert joined(updates, tail) == full[: full.index(stop)] == detok.text
            assert detok.stop_string == stop
            assert all(REPLACEMENT_CHAR not in u.text for u in updates)


def test_held_back_text_is_released_by_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world. EN", add_special_tokens=False)
    updates, tail, detok = stream(tokenizer, ids, stop=["END!"])
    assert not any(u.stopped for u in updates)
    assert "".join(u.text for u in updates) == "Hello world. "
    assert tail == "EN"
    assert detok.text == "Hello world. EN" == tokenizer.decode(ids)


def test_unwatched_tokens_stream_stop_strings_and_release_held_text(tokenizer: Tokenizer) -> None:
    """Below a request's min_tokens its text streams as it is; a stop string counts only in later text."""
    ids = tokenizer.encode("one two. one two. one two.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], [" two."])
    # Watched from the second "." on: the second " two." began in text already streamed.
    watched_from = len(tokenizer.encode("one two. one two", add_special_tokens=False))
    texts = []
    for i, t in enumerate(ids):
        update = detok.add_tokens([t], watch_stops=i >= watched_from)
        texts.append(update.text)
        if update.stopped:
            break
    assert update.stopped and update.stop_string == " two."
    # The first two " two." passed through; the third, wholly in watched text, ended it.
    assert "".join(texts) == detok.text == "one two. one two. one"
    # Held text is released at the first unwatched token rather than kept for a later match.
    held = IncrementalDetokenizer(tokenizer, [], ["one two!"])
    first, second = tokenizer.encode("one", add_special_tokens=False), tokenizer.encode(" two", add_special_tokens=False)
    assert held.add_tokens(first).text == ""  # "one" could start the stop string
    assert held.add_tokens(second, watch_stops=False).text == "one two"


def test_tokens_after_a_stop_are_ignored(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], [" two"])
    for t in ids:
        detok.add_tokens([t])
    assert detok.add_tokens(tokenizer.encode(" four", add_special_tokens=False)) == DetokenizerUpdate(
        "", stopped=True, stop_string=" two"
    )
    assert detok.finish() == ""
    assert detok.text == "one"


def test_empty_stop_string_is_rejected(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(tokenizer, [], ["ok", ""])
