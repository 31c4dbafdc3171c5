"""Chat template rendering: a model's Jinja2 template turned into prompt text, as Hugging Face does it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenwire.engine.errors import InvalidRequestError


class ChatMessageLike(Protocol):
    """Any object with ``role`` and ``content`` attributes (a proto ``ChatMessage``, a dataclass)."""

    role: str
    content: str


# A message as callers give it: {"role": ..., "content": ...} or a ChatMessage-like object.
Message = Mapping[str, Any] | ChatMessageLike


def _raise_exception(message: str) -> NoReturn:
    """What templates call to reject a conversation (``raise_exception('...')``)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON without Jinja's HTML escaping, with the options Hugging Face templates pass."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates use
    """The current local time, formatted (templates stamp dates into system prompts)."""
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        """Parse the block and render its body unchanged."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


def _make_environment() -> ImmutableSandboxedEnvironment:
    # NOTE: templates come from model files, i.e. untrusted code: the immutable sandbox stops them
    # from touching Python internals or mutating the messages they are given.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def normalize_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Plain ``{"role", "content", ...}`` dicts of strings, the only data a template gets to see.

    Args:
        messages: mappings or objects with ``role`` and ``content`` attributes. Mappings may carry
            more string fields (such as ``name``); they are passed on.

    Returns:
        One new dict per message.

    Raises:
        InvalidRequestError: ``messages`` is not a list of messages, or a message lacks ``role`` or
            ``content``, has an empty role, or has a value that is not a string.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidRequestError(f"messages must be a list of chat messages, got {type(messages).__name__}")
    plain: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if isinstance(message, Mapping):
            fields = dict(message)
        else:
            fields = {name: getattr(message, name) for name in ("role", "content") if hasattr(message, name)}
        for name in ("role", "content"):
            if name not in fields:
                raise InvalidRequestError(f"messages[{index}] has no {name!r}")
        for name, value in fields.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise InvalidRequestError(
                    f"messages[{index}][{name!r}] must be a string, got {type(value).__name__}"
                )
        if not fields["role"]:
            raise InvalidRequestError(f"messages[{index}] has an empty role")
        plain.append(fields)
    return plain


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja2 template text (``tokenizer.chat_template`` in a GGUF file,
            ``chat_template`` in ``tokenizer_config.json``).

    Raises:
        ValueError: the template does not compile.
    """

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat template source must be a non-empty string")
        try:
            self._template = _make_environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc.message} (line {exc.lineno})") from exc
        self.source = source

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
    ) -> str:
        """The prompt text for a conversation.

        Args:
            messages: the conversation, oldest first (see `normalize_messages`).
            add_generation_prompt: end with the header that opens the assistant's turn.
            bos_token: the model's BOS token text, for templates that write it themselves.
            eos_token: the model's EOS token text.

        Returns:
            The rendered text, special tokens written out as text.

        Raises:
            InvalidRequestError: a message is malformed, or the template rejects the conversation
                or fails while rendering it.
        """
        plain = normalize_messages(messages)
        try:
            # NOTE: tools and documents are given as None (not left undefined) because templates
            # test them with `is not none`, which an undefined variable passes.
            return self._template.render(
                messages=plain,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                tools=None,
                documents=None,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(f"chat template rejected the messages: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # NOTE: a template that indexes or compares message fields it assumed present fails
            # with a plain Python error; to the caller that is still a bad conversation.
            raise InvalidRequestError(f"chat template failed on the messages: {exc}") from exc
