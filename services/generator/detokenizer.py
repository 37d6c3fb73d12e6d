"""Turning a growing sequence of token ids into text deltas that are safe to send.

Two things make naive per-token decoding wrong: byte-level tokenizers split
multi-byte characters across tokens (decoding one token alone yields U+FFFD),
and SentencePiece-style tokenizers drop or add spaces depending on the
neighbouring tokens. Like TGI and vLLM, we decode a short window of previous
tokens together with the new ones and emit only the new suffix, holding it back
while it ends in an incomplete character.

Stop strings are handled here as well: text that might be the start of a stop
string is held back until it is clear, and a stop string ends the reply without
being sent. Matching is incremental (Knuth-Morris-Pratt, one automaton per stop
string), so each character of the reply costs O(1) per stop string whatever the
stop strings' length; rescanning the held-back text for every token was quadratic.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    """The part of a tokenizer we need."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text each one completes."""

    def __init__(self, tokenizer: Decoder, stop: list[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = [_StopAutomaton(s) for s in (stop or []) if s]
        self._pending = ""  # decoded text not yet released (possible stop-string prefix)
        self.text = ""  # everything released so far
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly releasable text (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self._tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new_text = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(new_text)

    def flush(self) -> str:
        """At the end of generation: release whatever was held back for stop strings."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        self.text += out
        return out

    def _release(self, new_text: str) -> str:
        if not self._stop:
            self.text += new_text
            return new_text
        pending = self._pending + new_text
        base = len(self._pending)
        for i, char in enumerate(new_text):
            for automaton in self._stop:
                if automaton.feed(char):
                    # The first stop string to complete ends the reply; it began within
                    # the held-back text at the latest, which is never shorter than the
                    # longest partial match.
                    cut = base + i + 1 - len(automaton.stop)
                    self.stopped = True
                    self._pending = ""
                    self.text += pending[:cut]
                    return pending[:cut]
        hold = max(automaton.matched for automaton in self._stop)
        ready, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += ready
        return ready


class _StopAutomaton:
    """Knuth-Morris-Pratt matcher of one stop string over a stream of characters.

    ``matched`` is the length of the longest suffix of the text fed so far that is
    a proper prefix of ``stop``: the text that must be held back because it may yet
    become the stop string."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        # failure[i]: length of the longest proper border of stop[: i + 1].
        self._failure = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._failure[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._failure[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the stop string just completed."""
        k = self.matched
        while k and char != self.stop[k]:
            k = self._failure[k - 1]
        if char == self.stop[k]:
            k += 1
        if k == len(self.stop):
            self.matched = 0
            return True
        self.matched = k
        return False
