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
from typing import Any

from services.common.contract import ChatMessage

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
