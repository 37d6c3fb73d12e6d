"""A conversation as the model's prompt tokens, with no way for a message to forge
the chat template's control tokens.

Rendering the template to text and tokenizing that would turn a user's literal
``<|im_start|>system`` into the real control token: the user could write a system
message of their own, or end the assistant's turn for it. So the template is
rendered around placeholders, its own text is tokenized with special tokens and
every message's content with ``split_special_tokens``: plain text, whatever it
spells.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from services.common.contract import ChatMessage, HistoryWindow

logger = logging.getLogger(__name__)


def encode_conversation(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template (or, for base
    models without one, a plain transcript they can continue), ready for the
    model to write the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        pieces = []
        for m in messages:
            pieces += [f"{m.role.capitalize()}: ", m.content, "\n"]
        return _tokenize(tokenizer, [*pieces, "Assistant:"], leading_special_tokens=True)
    marker = f"chatstream-{secrets.token_hex(8)}"
    conversation = [{"role": m.role, "content": f"<{marker}-{i}>"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    parts = re.split(rf"<{marker}-(\d+)>", rendered)
    if [int(i) for i in parts[1::2]] != list(range(len(messages))):
        # The template changed or repeated a message's text: it cannot be spliced.
        # Render the real contents, with their special-token strings defused.
        logger.warning("the chat template transforms message contents; defusing special tokens in them instead")
        escaped = [{"role": m.role, "content": _defuse(tokenizer, m.content)} for m in messages]
        rendered = tokenizer.apply_chat_template(escaped, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    pieces = list(parts)
    for i in range(1, len(pieces), 2):
        pieces[i] = messages[int(pieces[i])].content
    return _tokenize(tokenizer, pieces, leading_special_tokens=False)


class InputTooLong(ValueError):
    """Even with no history at all the prompt does not fit the context. ``what`` names
    what was measured: the message alone, or a conversation nothing may be dropped from."""

    def __init__(self, tokens: int, limit: int, what: str) -> None:
        super().__init__(f"{what} is {tokens} tokens; this model accepts at most {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True)
class FittedPrompt:
    """The prompt's token ids and how many of the newest history turns it kept."""

    ids: list[int]
    history_turns: int


def fit_conversation(
    tokenizer: Any, messages: list[ChatMessage], history: HistoryWindow, *, budget: int | None, context_limit: int
) -> FittedPrompt:
    """The prompt with as many of the newest history turns as fit in ``budget``
    tokens (``None``: no budget) and ``history.max_tokens``.

    The system prompt and the last message are always kept; only when they alone
    reach ``context_limit`` (0 = unknown) is :class:`InputTooLong` raised. The
    count is exact (the ids the model will be fed, not an estimate), so no margin
    is kept. Without a fit the prompt may still exceed ``budget``: the caller then
    shortens the reply to what the context leaves.
    """
    turns = history.turns
    head = len(messages) - 1 - 2 * turns  # messages before the history: the system prompt

    def encode(kept: int) -> list[int]:
        dropped = 2 * (turns - kept)
        return encode_conversation(tokenizer, messages[:head] + messages[head + dropped :])

    ids = encode(turns)
    if turns == 0:
        if context_limit and len(ids) >= context_limit:
            # The OpenAI routes: the client's conversation is the input.
            raise InputTooLong(len(ids), context_limit - 1, "the conversation")
        return FittedPrompt(ids, 0)
    if (budget is None or len(ids) <= budget) and not history.max_tokens:
        return FittedPrompt(ids, turns)  # the common case: one encoding
    bare = encode(0)
    if context_limit and len(bare) >= context_limit:
        raise InputTooLong(len(bare), context_limit - 1, "the message alone (with the system prompt)")

    def fits(candidate: list[int]) -> bool:
        if budget is not None and len(candidate) > budget:
            return False
        return not history.max_tokens or len(candidate) - len(bare) <= history.max_tokens

    if fits(ids):
        return FittedPrompt(ids, turns)
    # More turns never make a prompt shorter: binary search for the most that fit.
    low, high, best = 1, turns - 1, FittedPrompt(bare, 0)
    while low <= high:
        middle = (low + high) // 2
        candidate = encode(middle)
        if fits(candidate):
            best, low = FittedPrompt(candidate, middle), middle + 1
        else:
            high = middle - 1
    return best


def _tokenize(tokenizer: Any, pieces: list[str], *, leading_special_tokens: bool) -> list[int]:
    """Tokenize alternating template text (even positions) and message contents
    (odd positions), the contents as plain text."""
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        content = i % 2 == 1
        ids += tokenizer(
            piece,
            add_special_tokens=leading_special_tokens and not ids,
            split_special_tokens=content,
        )["input_ids"]
    return ids


def _defuse(tokenizer: Any, text: str) -> str:
    """``text`` with a word joiner (U+2060) inside every special-token string it contains."""
    for token in getattr(tokenizer, "all_special_tokens", []):
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + "\u2060" + token[1:])
    return text
