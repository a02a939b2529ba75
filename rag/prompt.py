"""Putting retrieved passages into a chat prompt, within a token budget.

The passages go into the last user message (not a separate system message) because every chat template
accepts user turns, while some reject system messages or allow only one at the start. The message becomes::

    Answer the question using the numbered passages below. Cite the passages you use as [n] ...

    [1] (source: guide.md)
    <passage text>

    [2] ...

    Question: <the user's original text>

Passages are numbered in rank order; the lowest-ranked ones are dropped first until the added text fits
the budget. The numbers match the ``index`` field of :meth:`Passage.to_source`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from rag.passage import Passage

RAG_INSTRUCTION = (
    "Answer the question using the numbered passages below. Cite the passages you use as [n], "
    "for example [1] or [2][3]. If the passages do not contain the answer, say so."
)


def last_user_text(messages: list[dict]) -> str | None:
    """The text of the last user message (text parts joined), or None if there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return None


def format_passages(passages: list[Passage]) -> str:
    """The numbered passage block, [1] first."""
    return "\n\n".join(f"[{n}] (source: {p.source})\n{p.text}" for n, p in enumerate(passages, start=1))


def rag_user_content(question: str, passages: list[Passage]) -> str:
    """The user message text with the instruction and the numbered passages before the question."""
    return f"{RAG_INSTRUCTION}\n\n{format_passages(passages)}\n\nQuestion: {question}"


def build_rag_messages(
    messages: list[dict],
    passages: list[Passage],
    count_tokens: Callable[[str], int],
    budget_tokens: int,
) -> tuple[list[dict], list[Passage]]:
    """Returns ``messages`` with the passages put into the last user message, and the passages used.

    Args:
        messages: OpenAI-style chat messages (``content`` a string or a list of parts); not modified.
        passages: retrieved passages, best first.
        count_tokens: the chat model's token count of a string.
        budget_tokens: how many tokens the added text (instruction, passages, "Question:") may take; the
            caller derives it from the context window, the prompt without passages and ``max_tokens``.

    Returns:
        The new messages and the passages actually included, in the order numbered [1], [2], ...
        Without a user message, or when not even the best passage fits, the messages are returned
        unchanged (a copy) with no passages.
    """
    messages = copy.deepcopy(messages)
    question = last_user_text(messages)
    if question is None:
        return messages, []
    base_tokens = count_tokens(question)
    used = list(passages)
    while used and count_tokens(rag_user_content(question, used)) - base_tokens > budget_tokens:
        used.pop()  # the lowest-ranked passage goes first
    if not used:
        return messages, []
    last_user = next(m for m in reversed(messages) if m.get("role") == "user")
    content = last_user.get("content")
    if isinstance(content, list):
        prefix = rag_user_content("", used).removesuffix("Question: ")
        last_user["content"] = [{"type": "text", "text": prefix + "Question:"}, *content]
    else:
        last_user["content"] = rag_user_content(question, used)
    return messages, used


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""
