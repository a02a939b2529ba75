"""Streaming tool calls: text deltas in, OpenAI content and ``tool_calls`` deltas out.

For each call the first delta carries ``index``, ``id`` and the function ``name``; later ones carry
fragments of ``arguments`` as the model writes them. Joined up, the deltas equal
:func:`parse_tool_calls` on the whole text, wherever the deltas were split: text that might still turn
into ``<tool_call>`` is held back, and so is whitespace that might end the content. The one exception:
a block that is broken only after its name was streamed (a model writing outside the tool-call grammar)
cannot be taken back; it is logged, and the final ``parse_tool_calls`` is the record.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from server.api.chat.tool_format import TOOL_CALL_BEGIN, TOOL_CALL_END, parse_call_body, random_call_id

logger = logging.getLogger(__name__)

NAME_PREFIX = re.compile(r'\s*\{\s*"name"\s*:\s*')
ARGUMENTS_PREFIX = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


@dataclass(frozen=True)
class ToolCallDelta:
    """OpenAI's ``choices[0].delta.tool_calls[k]``: ``id`` and ``name`` only on a call's first delta."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    """What one text delta adds: plain content and tool-call deltas (either may be empty)."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class OpenCall:
    """The block being written: its text so far and how much of it has been streamed."""

    body: str = ""
    name: str | None = None
    arguments_start: int | None = None  # where the arguments object starts in ``body``
    arguments_sent: int = 0  # characters of the arguments object already sent
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    arguments_done: bool = False


class ToolCallStreamParser:
    """Turns text deltas into content and tool-call deltas; one per streamed choice.

    Args:
        new_call_id: gives the id of call ``index`` (pass the same one to ``parse_tool_calls`` to compare).
    """

    def __init__(self, new_call_id: Callable[[int], str] = random_call_id):
        self._new_call_id = new_call_id
        self._pending = ""  # text not yet classified (a possible start of ``<tool_call>``)
        self._call: OpenCall | None = None
        self._calls = 0
        self._content_started = False
        self._held_whitespace = ""

    def feed(self, text: str) -> StreamDelta:
        """The deltas that ``text`` (the next piece of generated text) completes."""
        delta = StreamDelta()
        self._pending += text
        while self._pending:
            if self._call is None and not self._scan_text(delta):
                break
            if self._call is not None and not self._scan_call(delta):
                break
        return delta

    def finish(self) -> StreamDelta:
        """The deltas left when the generation ends (held text, a call cut off before its end tag)."""
        delta = StreamDelta()
        if self._call is not None:
            self._close_call(self._call.body, delta, complete=False)
        self._emit_content(self._pending, delta)
        self._pending = ""
        return delta

    # --- text outside calls ------------------------------------------------------------------------------

    def _scan_text(self, delta: StreamDelta) -> bool:
        """Send content up to a call's start; True when a call opened (scan on)."""
        start = self._pending.find(TOOL_CALL_BEGIN)
        if start >= 0:
            self._emit_content(self._pending[:start], delta)
            self._pending = self._pending[start + len(TOOL_CALL_BEGIN) :]
            self._call = OpenCall()
            return True
        keep = partial_suffix(self._pending, TOOL_CALL_BEGIN)
        self._emit_content(self._pending[: len(self._pending) - keep], delta)
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _emit_content(self, text: str, delta: StreamDelta) -> None:
        """Send content, holding back leading whitespace and whitespace that may end the content."""
        if not self._content_started:
            text = text.lstrip()
            if not text:
                return
            self._content_started = True
        text = self._held_whitespace + text
        body = text.rstrip()
        self._held_whitespace = text[len(body) :]
        delta.content += body

    # --- inside a call -----------------------------------------------------------------------------------

    def _scan_call(self, delta: StreamDelta) -> bool:
        """Take pending text into the open call; True when the call closed (scan on)."""
        call = self._call
        assert call is not None
        combined = call.body + self._pending
        end, next_begin = combined.find(TOOL_CALL_END), combined.find(TOOL_CALL_BEGIN)
        if next_begin >= 0 and (end < 0 or next_begin < end):  # left open: the next block closes it
            self._pending = combined[next_begin:]
            self._close_call(combined[:next_begin], delta, complete=False)
            return True
        if end >= 0:
            self._pending = combined[end + len(TOOL_CALL_END) :]
            self._close_call(combined[:end], delta, complete=True)
            return True
        keep = max(partial_suffix(combined, TOOL_CALL_END), partial_suffix(combined, TOOL_CALL_BEGIN))
        call.body, self._pending = combined[: len(combined) - keep], combined[len(combined) - keep :]
        self._stream_call(call, delta)
        return False

    def _stream_call(self, call: OpenCall, delta: StreamDelta) -> None:
        """Send the name once it is whole, then the arguments written so far."""
        if call.name is None:
            call.name, call.arguments_start = name_and_arguments_start(call.body)
            if call.name is None:
                return
            call_id = self._new_call_id(self._calls)
            delta.tool_calls.append(ToolCallDelta(self._calls, call_id, call.name))
        if call.arguments_start is None:
            _, call.arguments_start = name_and_arguments_start(call.body)
        if call.arguments_start is not None and not call.arguments_done:
            fragment = self._arguments_fragment(call)
            if fragment:
                delta.tool_calls.append(ToolCallDelta(self._calls, arguments=fragment))

    def _arguments_fragment(self, call: OpenCall) -> str:
        """The arguments text written since the last fragment, up to the end of the arguments object."""
        assert call.arguments_start is not None
        start = call.arguments_start + call.arguments_sent
        i = start
        while i < len(call.body) and not call.arguments_done:
            advance_json_depth(call, call.body[i])
            i += 1
        call.arguments_sent += i - start
        return call.body[start:i]

    def _close_call(self, body: str, delta: StreamDelta, complete: bool) -> None:
        """Finish the block: send what is left of it, or hand it back as content if it is no call."""
        call = self._call
        assert call is not None
        self._call = None
        parsed = parse_call_body(body)
        if parsed is None:
            if call.name is not None:
                logger.warning("a streamed tool call %r turned out malformed", call.name)
                self._calls += 1
                return
            raw = TOOL_CALL_BEGIN + body + (TOOL_CALL_END if complete else "")
            self._emit_content(raw, delta)
            return
        name, arguments = parsed
        if call.name is None:
            delta.tool_calls.append(ToolCallDelta(self._calls, self._new_call_id(self._calls), name))
        sent = ""
        if call.name is not None and call.arguments_start is not None:
            sent = body[call.arguments_start : call.arguments_start + call.arguments_sent]
        if arguments.startswith(sent):
            rest = arguments[len(sent) :]
            if rest:
                delta.tool_calls.append(ToolCallDelta(self._calls, arguments=rest))
        else:
            logger.warning("streamed arguments of tool call %r differ from the parsed ones", name)
        self._calls += 1


def name_and_arguments_start(body: str) -> tuple[str | None, int | None]:
    """The call's name once written whole, and where its arguments object starts once that is known."""
    match = NAME_PREFIX.match(body)
    if match is None:
        return None, None
    try:
        name, end = json.JSONDecoder().raw_decode(body, match.end())
    except json.JSONDecodeError:
        return None, None
    if not isinstance(name, str) or not name:
        return None, None
    arguments = ARGUMENTS_PREFIX.match(body, end)
    return name, (arguments.end() if arguments else None)


def advance_json_depth(call: OpenCall, char: str) -> None:
    """Track one character of the arguments object: string state, nesting depth, whether it closed."""
    if call.in_string:
        if call.escaped:
            call.escaped = False
        elif char == "\\":
            call.escaped = True
        elif char == '"':
            call.in_string = False
        return
    if char == '"':
        call.in_string = True
    elif char in "{[":
        call.depth += 1
    elif char in "}]":
        call.depth -= 1
        call.arguments_done = call.depth == 0


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is the start of ``tag`` (text to hold back)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
