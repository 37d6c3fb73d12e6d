"""A conversation never gets stuck: the prompt keeps the newest history turns that
fit the model's context after the reply's max_new_tokens (and HISTORY_MAX_TOKENS),
counted with the generator's own tokenizer and chat template; only an input that
alone does not fit is refused (422).

The end-to-end tests run the tiny test model (a real transformers model with a
512-token context and a chat template) in a real generator, so ten long turns
overflow its context for real.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from transformers import AutoTokenizer

from services.common.contract import ChatMessage, HistoryWindow
from services.generator.prompt import InputTooLong, encode_conversation, fit_conversation
from tests.conftest import tiny_generator_env
from tests.support.client import stream_chat
from tests.support.tiny_model import MAX_POSITION_EMBEDDINGS

MAX_NEW = 16


def _conversation(turns: int, words: int) -> list[ChatMessage]:
    messages = [ChatMessage("system", "Answer briefly.")]
    for t in range(turns):
        messages.append(ChatMessage("user", " ".join(f"question{t}-{w}" for w in range(words))))
        messages.append(ChatMessage("assistant", " ".join(f"answer{t}-{w}" for w in range(words // 2))))
    messages.append(ChatMessage("user", "and now?"))
    return messages


def _kept(messages: list[ChatMessage], turns: int, kept: int) -> list[ChatMessage]:
    head = len(messages) - 1 - 2 * turns
    return messages[:head] + messages[head + 2 * (turns - kept) :]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    """The default model's real tokenizer and chat template (SmolLM2)."""
    return AutoTokenizer.from_pretrained(default_model)


def test_all_history_is_kept_when_it_fits(tokenizer) -> None:
    messages = _conversation(turns=3, words=10)
    fitted = fit_conversation(tokenizer, messages, HistoryWindow(turns=3), budget=8000, context_limit=8192)
    assert fitted.history_turns == 3
    assert fitted.ids == encode_conversation(tokenizer, messages)


def test_the_most_newest_turns_that_fit_are_kept(tokenizer) -> None:
    messages = _conversation(turns=12, words=40)
    full = len(encode_conversation(tokenizer, messages))
    budget = full // 2
    fitted = fit_conversation(tokenizer, messages, HistoryWindow(turns=12), budget=budget, context_limit=8192)
    kept = fitted.history_turns
    assert 0 < kept < 12
    # Exactly the newest ``kept`` turns, the system prompt and the input, as the model
    # will see them; one more turn would not fit.
    assert fitted.ids == encode_conversation(tokenizer, _kept(messages, 12, kept))
    assert len(fitted.ids) <= budget
    assert len(encode_conversation(tokenizer, _kept(messages, 12, kept + 1))) > budget
    text = tokenizer.decode(fitted.ids)
    assert "Answer briefly." in text and "and now?" in text
    assert "question11-0" in text and "question0-0" not in text


def test_history_max_tokens_caps_the_history_below_the_context(tokenizer) -> None:
    messages = _conversation(turns=8, words=20)
    bare = len(encode_conversation(tokenizer, _kept(messages, 8, 0)))
    fitted = fit_conversation(
        tokenizer, messages, HistoryWindow(turns=8, max_tokens=300), budget=8000, context_limit=8192
    )
    assert 0 < fitted.history_turns < 8
    assert len(fitted.ids) - bare <= 300
    one_more = encode_conversation(tokenizer, _kept(messages, 8, fitted.history_turns + 1))
    assert len(one_more) - bare > 300


def test_no_history_fits_then_the_input_alone_is_used(tokenizer) -> None:
    messages = _conversation(turns=4, words=50)
    bare = encode_conversation(tokenizer, _kept(messages, 4, 0))
    fitted = fit_conversation(tokenizer, messages, HistoryWindow(turns=4), budget=len(bare) - 1, context_limit=8192)
    assert fitted.history_turns == 0 and fitted.ids == bare


def test_an_input_that_alone_does_not_fit_is_refused(tokenizer) -> None:
    messages = [ChatMessage("user", "word " * 400)]
    with pytest.raises(InputTooLong, match="the conversation is") as error:
        fit_conversation(tokenizer, messages, HistoryWindow(), budget=100, context_limit=200)
    assert error.value.tokens > 200 and error.value.limit == 199
    with_history = _conversation(turns=2, words=5)[:-1] + messages
    with pytest.raises(InputTooLong, match="the message alone"):
        fit_conversation(tokenizer, with_history, HistoryWindow(turns=2), budget=100, context_limit=200)


# ---------------------------------------------------------------- end to end


def _long_input(turn: int) -> str:
    # ~125 tokens of the tiny model's tokenizer: three of them and their replies
    # overflow its 512-token context.
    return f"turn {turn}: " + " ".join(f"w{turn}x{i}" for i in range(25))


async def _turn(client: httpx.AsyncClient, text: str) -> tuple[int, dict]:
    reply = await stream_chat(client, "/chat_stream", {"user_input": text}, sse=True)
    assert reply.status == 200, reply.text
    events = reply.sse_events()
    assert events[-1][0] == "done", events[-1]
    return len([e for e in events if e[0] == "token"]), events[-1][1]


def test_ten_long_turns_in_one_session_are_all_answered(stack, tiny_model) -> None:
    stack.generator(tiny_generator_env(tiny_model, MAX_NEW_TOKENS=str(MAX_NEW)))
    api = stack.api()

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
            return [(await _turn(client, _long_input(t)))[1] for t in range(10)]

    dones = asyncio.run(run())
    budget = MAX_POSITION_EMBEDDINGS - MAX_NEW
    for turn, done in enumerate(dones):
        assert done["usage"]["prompt_tokens"] <= budget, (turn, done)
        assert 0 <= done["history_turns"] <= turn
    # Early turns keep their whole history; once it outgrows the context the oldest
    # turns drop out, and later turns still get some history.
    assert dones[1]["history_turns"] == 1
    assert dones[9]["history_turns"] < 9
    assert any(0 < d["history_turns"] < t for t, d in enumerate(dones))
    # The session still holds every turn: only the prompt was trimmed.
    session_keys = stack.redis.keys("chatstream:session:*")
    assert len(session_keys) == 1 and stack.redis.llen(session_keys[0]) == 10


def test_history_max_tokens_keeps_less_history(stack, tiny_model) -> None:
    stack.generator(tiny_generator_env(tiny_model, MAX_NEW_TOKENS=str(MAX_NEW)))
    uncapped = stack.api()
    capped = stack.api({"HISTORY_MAX_TOKENS": "60"})

    async def run() -> tuple[dict, dict]:
        async with httpx.AsyncClient(base_url=uncapped.base_url, timeout=60) as client:
            for t in range(3):
                await _turn(client, f"short question {t}")
            _, free = await _turn(client, "short question 3")
            # The same session (cookie) through the capped API pod.
            capped_client = httpx.AsyncClient(base_url=capped.base_url, timeout=60, cookies=client.cookies)
            async with capped_client:
                _, limited = await _turn(capped_client, "short question 4")
        return free, limited

    free, limited = asyncio.run(run())
    assert free["history_turns"] == 3
    assert limited["history_turns"] < 4
    assert limited["usage"]["prompt_tokens"] < free["usage"]["prompt_tokens"] + 60


def test_an_input_too_long_for_the_model_is_422_saying_so(stack, tiny_model) -> None:
    stack.generator(tiny_generator_env(tiny_model, MAX_NEW_TOKENS=str(MAX_NEW)))
    api = stack.api()
    with httpx.Client(base_url=api.base_url, timeout=60) as client:
        assert client.post("/chat_stream", json={"user_input": "a short first turn"}).status_code == 200
        # With history that could be dropped, the message says it is the input itself.
        response = client.post("/chat_stream", json={"user_input": "many words " * 400})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "prompt_too_long"
    assert "the message alone" in body["message"] and str(MAX_POSITION_EMBEDDINGS - 1) in body["message"]
