"""The Responses API's output items — the assistant's ``message`` and its ``function_call`` items — and
the stream events that build them, from generated text.

Tool calls are read out of the text by chat's own stream parser (``server/api/chat/tool_call_stream.py``,
whose deltas add up to ``parse_tool_calls`` on the whole text), for a stream and a whole answer alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from server.api.chat.tool_call_stream import StreamDelta, ToolCallStreamParser

TAG_START = re.compile("(?=<)")

Event = tuple[str, dict]  # (event type, its fields other than type and sequence_number)


def message_item(item_id: str, text: str, status: str) -> dict:
    """An assistant ``message`` with one ``output_text`` part (none while in progress)."""
    content = [output_text(text)] if status != "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(text: str, tools: bool, response_id: str, status: str) -> list[dict]:
    """A finished generation's items, exactly as a stream of the same text builds them: the message
    (text outside calls; with tools, text between calls is a message of its own) and one item per call.

    ``output`` is never empty: a generation with neither text nor calls has an empty message. A call
    cut off (by ``max_output_tokens``) is a ``function_call`` item with the arguments written so far
    and the response's ``incomplete`` status, as in a stream, where its name has already been sent.
    """
    items = OutputItemStream(response_id, tools)
    for _ in (*items.start(), *items.feed(text), *items.finish(status)):
        pass
    return items.items


class OutputItemStream:
    """Turns text deltas into the output item events, one item open at a time; one per response.

    Without tools the message opens at once and every delta is message text. With tools, text goes
    through chat's :class:`ToolCallStreamParser`: content opens (or continues) the message, a call's
    name opens a ``function_call`` item and its argument fragments are
    ``response.function_call_arguments.delta`` events.
    """

    def __init__(self, response_id: str, tools: bool):
        self.response_id = response_id
        self.parser = ToolCallStreamParser() if tools else None
        self.items: list[dict] = []  # every item opened so far, the last possibly still open
        self._open: dict | None = None
        self._text = ""  # the open item's text or arguments so far
        self._open_call: int | None = None  # the parser's index of the open function_call item

    def start(self) -> Iterator[Event]:
        if self.parser is None:
            yield from self._open_message()

    def feed(self, text: str) -> Iterator[Event]:
        if self.parser is None:
            yield from self._message_text(text)
            return
        # one parser delta holds its content and its calls apart, not their order: fed in pieces that
        # each start a tag at most, content and calls keep the order they have in the text
        for piece in TAG_START.split(text):
            if piece:
                yield from self._apply(self.parser.feed(piece))

    def finish(self, status: str) -> Iterator[Event]:
        """The events that close the response's items; ``status`` is the response's."""
        if self.parser is not None:
            yield from self._apply(self.parser.finish())
        if not self.items:
            yield from self._open_message()
        yield from self._close(status)

    # --- items -------------------------------------------------------------------------------------------

    def _apply(self, delta: StreamDelta) -> Iterator[Event]:
        """One parser delta's events. The delta holds its content and its calls apart; in the text,
        the open call's last fragments come before any content, and new calls after it."""
        calls = list(delta.tool_calls)
        while calls and calls[0].name is None and calls[0].index == self._open_call:
            yield from self._arguments(calls.pop(0).arguments)
        if delta.content:
            yield from self._message_text(delta.content)
        for call in calls:
            if call.name is not None:
                yield from self._close("completed")
                item_id = f"fc_{self.response_id}_{call.index}"
                yield from self._open_item(
                    function_call_item(item_id, call.id or "", call.name, "", "in_progress")
                )
                self._open_call = call.index
            yield from self._arguments(call.arguments)

    def _arguments(self, fragment: str) -> Iterator[Event]:
        if fragment:
            self._text += fragment
            yield "response.function_call_arguments.delta", {**self._where(), "delta": fragment}

    def _message_text(self, text: str) -> Iterator[Event]:
        if self._open is None or self._open["type"] != "message":
            text = text.lstrip()  # whitespace between a call and the text after it belongs to neither
            if not text:
                return
            yield from self._close("completed")
            yield from self._open_message()
        self._text += text
        yield (
            "response.output_text.delta",
            {**self._where(), "content_index": 0, "delta": text, "logprobs": []},
        )

    def _open_message(self) -> Iterator[Event]:
        item_id = f"msg_{self.response_id}" + (f"_{len(self.items)}" if self.items else "")
        yield from self._open_item(message_item(item_id, "", "in_progress"))
        yield "response.content_part.added", {**self._where(), "content_index": 0, "part": output_text("")}

    def _open_item(self, item: dict) -> Iterator[Event]:
        self._open, self._text = item, ""
        self.items.append(item)
        yield "response.output_item.added", {"output_index": len(self.items) - 1, "item": dict(item)}

    def _close(self, status: str) -> Iterator[Event]:
        item = self._open
        if item is None:
            return
        where, text = self._where(), self._text
        if item["type"] == "message":
            part = {**where, "content_index": 0}
            yield "response.output_text.done", {**part, "text": text, "logprobs": []}
            yield "response.content_part.done", {**part, "part": output_text(text)}
            item.update(message_item(item["id"], text, status))
        else:
            yield "response.function_call_arguments.done", {**where, "name": item["name"], "arguments": text}
            item.update(arguments=text, status=status)
        yield "response.output_item.done", {"output_index": where["output_index"], "item": dict(item)}
        self._open, self._open_call = None, None

    def _where(self) -> dict:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}
