"""Stop strings: bounded at the door, matched in linear time by the generator."""

from __future__ import annotations

import random

import pytest

from services.generator import detokenizer
from services.generator.detokenizer import IncrementalDetokenizer


class CharTokenizer:
    """One token per character (its code point): the detokenizer's stop handling alone."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def run(text: str, stop: list[str]) -> tuple[str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(CharTokenizer(), stop)
    out = [detok.push(ord(c)) for c in text]
    out.append(detok.flush())
    return "".join(out), detok


def reference(text: str, stop: list[str]) -> str:
    """The reply ends just before the stop string that completes first."""
    for end in range(1, len(text) + 1):
        for s in stop:
            if text[:end].endswith(s):
                return text[: end - len(s)]
    return text


def test_stop_strings_end_the_reply_where_the_first_one_completes():
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        reply, detok = run(text, stop)
        assert reply == reference(text, stop), (text, stop)
        assert detok.stopped == (reply != text or any(text.endswith(s) for s in stop))


def test_nothing_is_held_back_longer_than_a_stop_string_could_still_match():
    detok = IncrementalDetokenizer(CharTokenizer(), ["abcab"])
    released = "".join(detok.push(ord(c)) for c in "xxabca")
    assert released == "xx", "'abca' may still become 'abcab'"
    assert detok.push(ord("c")) == "abca" + "c", "no suffix of 'abcac' starts 'abcab': all of it goes out"


class CountingList(list):
    lookups = 0

    def __getitem__(self, index):
        CountingList.lookups += 1
        return super().__getitem__(index)


@pytest.mark.parametrize("length", [16, 256])
def test_matching_work_is_linear_in_the_reply_not_in_the_stop_length(monkeypatch, length):
    """The worst case of naive rescanning: a long stop string whose prefixes keep
    almost matching ('aaa…ab' against 'aaa…a'). Knuth-Morris-Pratt follows at most
    one failure link per character fed, on average."""
    original = detokenizer._StopAutomaton.__init__

    def counting_init(self, stop):
        original(self, stop)
        self._failure = CountingList(self._failure)

    monkeypatch.setattr(detokenizer._StopAutomaton, "__init__", counting_init)
    CountingList.lookups = 0
    stop = "a" * (length - 1) + "b"
    text = ("a" * (length - 2) + "c") * 40
    reply, _ = run(text, [stop, stop[::-1], "a" * length, "ab" * (length // 2)])
    assert reply == text
    assert CountingList.lookups <= 4 * len(text), f"{CountingList.lookups} failure-link steps for {len(text)} characters"
