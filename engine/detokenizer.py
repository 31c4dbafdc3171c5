"""Incremental detokenization with stop strings: text deltas that add up to the decoded completion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# What a decoder yields for bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    """Anything that turns token ids into text (the engine's Tokenizer, a ``tokenizers.Tokenizer``)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode token ids to text."""
        ...


@dataclass(frozen=True)
class DetokenizerUpdate:
    """The text that is safe to stream after some new tokens.

    Attributes:
        text: new text (possibly empty); never a partial character, never part of a stop string.
        stopped: a stop string matched; ``text`` ends just before it and the request is done.
        stop_string: the stop string that matched, when ``stopped``.
    """

    text: str
    stopped: bool = False
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns one request's generated tokens into streamable text deltas, watching for stop strings.

    Decoding is incremental (the prefix/read-offset technique of vLLM and TGI): each step decodes
    only a short window of recent tokens, once with and once without the new ones, and emits the
    difference, so a step costs O(new tokens), not O(tokens so far). While the window's text ends
    in U+FFFD (a character whose bytes are split over several tokens) nothing is emitted; the text
    comes out whole once the rest of its bytes arrive.

    Stop strings are matched on the decoded text, also across token boundaries. Any suffix of the
    pending text that could still grow into a stop string is held back, so no part of a stop string
    is ever streamed; :meth:`finish` releases it when the request ends for another reason.

    The promise: the concatenation of every ``add_tokens(...).text`` and ``finish()`` equals
    ``tokenizer.decode(all_token_ids, skip_special_tokens)``, cut just before the first stop
    string when one matched (the first in text of watched tokens: see ``add_tokens``).
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        """Create the detokenizer of one request.

        Args:
            tokenizer: decodes token ids (``decode(ids, skip_special_tokens=...)``).
            prompt_token_ids: the request's prompt. NOTE: the completion's text is the decoding of
                the generated tokens alone (that is the contract), so the prompt is not decoded as
                context; it is kept for reference only.
            stop: stop strings; the text ends before the first one to appear.
            skip_special_tokens: leave special tokens out of the text.

        Raises:
            ValueError: a stop string is empty.
        """
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.prompt_token_ids: tuple[int, ...] = tuple(prompt_token_ids)
        self._tokenizer = tokenizer
        self._stop: tuple[str, ...] = tuple(stop)
        self._skip_special_tokens = skip_special_tokens
        # The decode window: tokens from the start of the previously emitted run; the first
        # `_read` of them were already turned into text, `_prefix_text` is their decoding.
        self._window: list[int] = []
        self._read = 0
        self._prefix_text: str | None = ""
        # Decoded text not streamed yet because it could be the start of a stop string.
        self._held = ""
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self._stop_string: str | None = None
        self._done = False

    @property
    def text(self) -> str:
        """The whole completion text streamed so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
        return self._text_cache

    @property
    def stopped(self) -> bool:
        """True once a stop string matched."""
        return self._stop_string is not None

    @property
    def stop_string(self) -> str | None:
        """The stop string that matched, if any."""
        return self._stop_string

    def add_tokens(self, token_ids: Sequence[int], watch_stops: bool = True) -> DetokenizerUpdate:
        """Take newly generated tokens and return the text that is safe to stream now.

        After a stop string matched or :meth:`finish` ran, further tokens are ignored and the
        update is empty (still ``stopped`` when a stop string ended the text).

        Args:
            token_ids: the new tokens, in order.
            watch_stops: False while stop strings may not end the request yet (below its
                ``min_tokens``): the text, held-back text included, is streamed as it is, and only
                text of later tokens can hold a stop string.

        Returns:
            The new text and whether a stop string ended the request.
        """
        if self._done:
            return DetokenizerUpdate("", self.stopped, self._stop_string)
        self._window.extend(token_ids)
        new_text = self._decode_window(final=False)
        if not watch_stops:
            pending, self._held = self._held + new_text, ""
            return DetokenizerUpdate(self._emit(pending))
        return self._release(new_text, final=False)

    def finish(self) -> str:
        """Flush everything held back when the request ends for another reason (EOS, length, cancel).

        Bytes of an incomplete character at the very end are decoded as the tokenizer decodes them
        (usually U+FFFD). A stop string found in the flushed text still cuts it.

        Returns:
            The remaining text (empty after a stop string matched, or on a second call).
        """
        if self._done:
            return ""
        update = self._release(self._decode_window(final=True), final=True)
        self._done = True
        return update.text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_window(self, final: bool) -> str:
        """New complete text of the window's unread tokens; moves the window forward when there is some."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[: self._read])
        full = self._decode(self._window)
        # NOTE: decoding the window with its already-read tokens as context (instead of the new
        # tokens alone) keeps tokenizer-specific joins right, e.g. SentencePiece's leading space.
        if len(full) <= len(self._prefix_text) or (not final and full.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or a character still waits for its remaining bytes
        new_text = full[len(self._prefix_text) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = None  # decoded lazily at the next step
        return new_text

    def _release(self, new_text: str, final: bool) -> DetokenizerUpdate:
        """Append new text, cut at the earliest stop string, hold back a possible stop-string start."""
        pending = self._held + new_text
        match = _earliest_stop(pending, self._stop)
        if match is not None:
            start, stop_string = match
            self._stop_string = stop_string
            self._done = True
            self._held = ""
            return DetokenizerUpdate(self._emit(pending[:start]), True, stop_string)
        keep = 0 if final else _stop_prefix_len(pending, self._stop)
        self._held = pending[len(pending) - keep :]
        return DetokenizerUpdate(self._emit(pending[: len(pending) - keep]))

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
            self._text_cache = None
        return text


def _earliest_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(start, stop string) of the earliest stop string in text; on a tie the first listed wins."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        if len(s) < 2:
            continue
        tail = text[-(len(s) - 1) :]
        # NOTE: the earliest position in the tail where s could start gives the longest suffix.
        i = tail.find(s[0])
        while i != -1 and len(tail) - i > best:
            if s.startswith(tail[i:]):
                best = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return best
