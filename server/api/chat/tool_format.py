"""The tool-calling format for chat templates without tool support (SmolLM2's): Hermes-style.

- The tools are described in the system turn: a short instruction and each tool's OpenAI definition
  (name, description, JSON-schema parameters) as one JSON line inside ``<tools></tools>``.
- The assistant calls a tool by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
  parallel calls are several such blocks, text before them is the message's ``content``.
- A tool's result goes back as a user turn holding ``<tool_response>{"tool_call_id": ..., "name": ...,
  "content": ...}</tool_response>`` (consecutive results share one turn): every template renders a user
  turn, while a ``tool`` role is shown to a model that never saw one.

When a tokenizer's template handles ``tools`` itself (:func:`template_supports_tools`), the messages and
tools go to ``apply_chat_template(..., tools=...)`` instead. Pure functions: no FastAPI, no model.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.engine.structured import GrammarInvalid, GrammarSpec, ToolCallFormat

logger = logging.getLogger(__name__)

TOOL_CALL_BEGIN = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_BEGIN = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

TOOLS_INSTRUCTION = """# Tools

You can call functions to help answer. These are the functions, one JSON definition per line:
<tools>
{definitions}
</tools>

To call a function, write a JSON object with its name and arguments between <tool_call> and </tool_call>:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>
Write one such block per call. Function results come back between <tool_response> and </tool_response>."""

CHOICE_INSTRUCTIONS = {
    "auto": "",
    "required": "\nYou must call at least one function now.",
}

# A block runs to its end tag or, left open, to the next block's start or the end of the text.
BLOCK_PATTERN = re.compile(
    f"{re.escape(TOOL_CALL_BEGIN)}(.*?)(?:{re.escape(TOOL_CALL_END)}|(?={re.escape(TOOL_CALL_BEGIN)})|\\Z)",
    re.S,
)


class ToolFormatError(ValueError):
    """Tools, tool calls or tool messages that cannot be rendered; ``param`` names the request field."""

    code = "invalid_tool_request"

    def __init__(self, param: str, reason: str):
        super().__init__(f"Invalid {param}: {reason}")
        self.param = param
        self.reason = reason


@dataclass(frozen=True)
class ToolCall:
    """One call the assistant made: OpenAI's ``tool_calls[i]`` (``arguments_json`` is JSON text)."""

    id: str
    name: str
    arguments_json: str


def random_call_id(index: int) -> str:
    """A fresh OpenAI-style call id (``call_`` + 24 hex digits); ``index`` is unused."""
    return f"call_{uuid.uuid4().hex[:24]}"


# --- rendering the conversation --------------------------------------------------------------------------


def tool_name(tool: dict[str, Any], index: int) -> str:
    """The function name of an OpenAI tool definition."""
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name or tool.get("type", "function") != "function":
        raise ToolFormatError(
            f"tools[{index}]", 'a tool must be {"type": "function", "function": {"name": ...}}'
        )
    return name


def chosen_tool_name(tool_choice: Any) -> str | None:
    """The forced function's name when ``tool_choice`` names one; None for auto, none and required."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise ToolFormatError(
                "tool_choice", 'a named tool_choice is {"type": "function", "function": {"name"}}'
            )
        return name
    if tool_choice in (None, "auto", "none", "required"):
        return None
    raise ToolFormatError("tool_choice", f"{tool_choice!r} is not auto, none, required or a named function")


def tools_system_text(tools: list[dict[str, Any]], tool_choice: Any = "auto") -> str:
    """The system-turn text describing ``tools`` and what ``tool_choice`` asks for."""
    names = [tool_name(tool, i) for i, tool in enumerate(tools)]
    definitions = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    forced = chosen_tool_name(tool_choice)
    if forced is not None:
        if forced not in names:
            raise ToolFormatError("tool_choice", f"names {forced!r}, which is not among the tools")
        choice_text = f"\nYou must call the function {forced} now."
    else:
        choice_text = CHOICE_INSTRUCTIONS.get(tool_choice or "auto", "")
    return TOOLS_INSTRUCTION.format(definitions=definitions) + choice_text


def message_text(message: dict[str, Any], param: str) -> str:
    """A message's content as text (a string, None, or a list of text parts)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ToolFormatError(f"{param}.content", "only text content can be rendered")


def tool_call_block(name: str, arguments: Any) -> str:
    """One ``<tool_call>`` block, in the layout the tool-call grammar generates."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_BEGIN}\n{body}\n{TOOL_CALL_END}"


def assistant_text(message: dict[str, Any], param: str) -> str:
    """An assistant message with its ``tool_calls`` written out as blocks after its content."""
    parts = [message_text(message, param)] if message.get("content") else []
    for j, call in enumerate(message.get("tool_calls") or []):
        where = f"{param}.tool_calls[{j}].function"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolFormatError(where, "a tool call needs a function name")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except json.JSONDecodeError as e:
            raise ToolFormatError(f"{where}.arguments", f"not JSON: {e}") from e
        parts.append(tool_call_block(function["name"], arguments))
    return "\n".join(parts)


def tool_response_text(message: dict[str, Any], call_names: dict[str, str], param: str) -> str:
    """One ``<tool_response>`` block for a ``tool`` message."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise ToolFormatError(f"{param}.tool_call_id", "a tool message needs the tool_call_id it answers")
    response = {"tool_call_id": call_id, "name": message.get("name") or call_names.get(call_id, "")}
    response["content"] = message_text(message, param)
    return f"{TOOL_RESPONSE_BEGIN}\n{json.dumps(response, ensure_ascii=False)}\n{TOOL_RESPONSE_END}"


def with_tools_system(messages: list[dict[str, str]], system_text: str) -> list[dict[str, str]]:
    """Add ``system_text`` to the first system turn, or open the conversation with one."""
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{system_text}".lstrip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": system_text}, *messages]


def render_tool_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any = "auto"
) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` messages any chat template renders, tools and tool turns included.

    Assistant ``tool_calls`` become ``<tool_call>`` blocks, ``tool`` messages become user turns of
    ``<tool_response>`` blocks (consecutive ones merged), and the tools are described in the system turn
    (not when ``tool_choice`` is ``none`` or there are no tools).

    Raises:
        ToolFormatError: a malformed tool, tool call, tool message or tool_choice, naming the field.
    """
    rendered: list[dict[str, str]] = []
    call_names: dict[str, str] = {}
    previous_was_tool = False
    for i, message in enumerate(messages):
        param, role = f"messages[{i}]", message.get("role")
        if role == "tool":
            text = tool_response_text(message, call_names, param)
            if previous_was_tool:
                rendered[-1] = {"role": "user", "content": f"{rendered[-1]['content']}\n{text}"}
            else:
                rendered.append({"role": "user", "content": text})
        elif role == "assistant":
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    call_names[str(call.get("id"))] = str(call["function"].get("name", ""))
            rendered.append({"role": "assistant", "content": assistant_text(message, param)})
        else:
            rendered.append({"role": str(role), "content": message_text(message, param)})
        previous_was_tool = role == "tool"
    if tools and tool_choice != "none":
        rendered = with_tools_system(rendered, tools_system_text(tools, tool_choice))
    return rendered


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` itself (then pass them to it).

    Renders one conversation with and without a probe tool: a template that ignores ``tools`` gives the
    same text both times.
    """
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [{"type": "function", "function": {"name": "loraplex_probe_tool", "parameters": NO_PARAMETERS}}]
    messages = [{"role": "user", "content": "hi"}]
    try:
        plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with_tools = tokenizer.apply_chat_template(
            messages, tools=probe, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # a template that raises on tools does not support them
        logger.debug("chat template refused tools: %s", e)
        return False
    return plain != with_tools


# --- constraining the output ---------------------------------------------------------------------------


def tool_call_grammar(
    tools: list[dict[str, Any]], tool_choice: Any = "auto", parallel_tool_calls: bool = True
) -> GrammarSpec | None:
    """The grammar that keeps tool calls well-formed; None for ``tool_choice="none"`` (no constraint).

    ``required``: the output is only ``<tool_call>`` blocks (one, or one or more with
    ``parallel_tool_calls``) whose JSON is ``{"name": <a tool>, "arguments": <valid for its parameters>}``.
    A named tool: exactly one call of it, whatever ``parallel_tool_calls`` says (OpenAI's "forced
    function" calls exactly one function; a small model would otherwise repeat the call until
    ``max_tokens``, which clients such as instructor report as an incomplete output).
    ``auto``: free text, unconstrained until ``<tool_call>`` is written; then the calls as above.

    Raises:
        ToolFormatError: a malformed tool or tool_choice.
        GrammarInvalid: no tools, or a tool_choice naming a tool not among them.
    """
    if tool_choice == "none":
        return None
    if not tools:
        raise GrammarInvalid("tools", "tool_choice needs at least one tool")
    forced = chosen_tool_name(tool_choice)
    entries = []
    for i, tool in enumerate(tools):
        parameters = tool["function"].get("parameters") if tool_name(tool, i) else None
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolFormatError(f"tools[{i}].function.parameters", "must be a JSON schema object")
        entries.append(
            (tool["function"]["name"], json.dumps(parameters or NO_PARAMETERS, ensure_ascii=False))
        )
    mode = forced if forced is not None else (tool_choice or "auto")
    parallel = parallel_tool_calls and forced is None
    fmt = ToolCallFormat(tuple(entries), mode, parallel, TOOL_CALL_BEGIN, TOOL_CALL_END)
    return GrammarSpec("tool_calls", fmt, "tools")


# --- parsing the output --------------------------------------------------------------------------------


def member_spans(object_text: str) -> dict[str, tuple[int, int]]:
    """Where each top-level member's value lies in the text of a (valid) JSON object."""
    decoder, spans = json.JSONDecoder(), {}
    i = skip_whitespace(object_text, object_text.index("{") + 1)
    while object_text[i] != "}":
        key, i = decoder.raw_decode(object_text, i)
        i = skip_whitespace(object_text, skip_whitespace(object_text, i) + 1)  # past ':'
        _, end = decoder.raw_decode(object_text, i)
        spans[key] = (i, end)
        i = skip_whitespace(object_text, end)
        if object_text[i] == ",":
            i = skip_whitespace(object_text, i + 1)
    return spans


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def parse_call_body(body: str) -> tuple[str, str] | None:
    """``(name, arguments_json)`` from one block's JSON, or None when it is not a call.

    ``arguments_json`` is the arguments object exactly as written (so streamed fragments add up to it);
    arguments given as a JSON string are taken as that string; ``parameters`` is read as ``arguments``.
    """
    text = body.strip()
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    key = "arguments" if "arguments" in call else "parameters" if "parameters" in call else None
    if key is None:
        return call["name"], "{}"
    arguments = call[key]
    if isinstance(arguments, str):
        return call["name"], arguments
    if not isinstance(arguments, dict):
        return None
    start, end = member_spans(text)[key]
    return call["name"], text[start:end]


def parse_tool_calls(
    text: str, new_call_id: Callable[[int], str] = random_call_id
) -> tuple[str | None, list[ToolCall]]:
    """Split generated text into its content and its tool calls.

    A block is a call when its JSON has a ``name`` (a block left open, cut off or followed by the next
    ``<tool_call>``, counts when its JSON is complete); anything else, broken blocks included, stays in
    the content. The content is the text outside the calls, stripped, or None when empty.
    """
    content_parts, calls = [], []
    position = 0
    for match in BLOCK_PATTERN.finditer(text):
        parsed = parse_call_body(match.group(1))
        if parsed is None:
            continue
        content_parts.append(text[position : match.start()])
        calls.append(ToolCall(new_call_id(len(calls)), parsed[0], parsed[1]))
        position = match.end()
    content_parts.append(text[position:])
    content = "".join(content_parts).strip()
    return (content or None), calls
