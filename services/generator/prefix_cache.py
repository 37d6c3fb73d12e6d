"""The key/value cache of recent conversations, so that a follow-up turn prefills
only its new tokens.

Turn *n + 1* of a chat sends the whole history again: the prompt of turn *n*, its
reply, and a new user message. Without reuse every turn runs the whole history
through the model, and the time to first token grows with the conversation. When
a sequence leaves the decoder, its cache row (prompt and reply, unpadded) is kept
here under its token ids; a new prompt starts from the longest cached prefix it
shares, cropped to that length, and prefills only the rest. Attention is causal,
so the cache of the first *k* positions depends only on the first *k* tokens: a
prompt that diverges from an entry anywhere (a history turn dropped to fit the
context, a reply re-tokenized differently) still reuses everything before the
divergence, exactly. vLLM's automatic prefix caching does the same with hashed
blocks of a paged cache; here entries are whole sequences in an LRU bounded by
bytes (``PREFIX_CACHE_MB``), which is enough for conversations.

Entries are partitioned by a salt (the tenant): one tenant's prompt never starts
from another's cache, so cache hits cannot tell a tenant what another one sent
(vLLM's ``cache_salt``).

Not thread-safe: each decoder uses it from its one decode thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from services.generator import metrics

#: One layer's cached keys and values, each ``[1, kv_heads, length, head_dim]``.
LayerKV = tuple[Any, Any]


@dataclass
class _Entry:
    salt: str
    tokens: list[int]
    layers: list[LayerKV]
    nbytes: int


class PrefixCache:
    """Least-recently-used sequences' key/value caches, within ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        self.nbytes = 0
        #: Prompt tokens served from the cache and prompt tokens looked up (metrics, tests).
        self.hit_tokens = 0
        self.lookup_tokens = 0

    @property
    def enabled(self) -> bool:
        """False with a capacity of 0 (``PREFIX_CACHE_MB=0``)."""
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, salt: str, prompt_ids: list[int]) -> tuple[list[LayerKV], int]:
        """The cached keys and values of the longest prefix ``prompt_ids`` shares with an
        entry of ``salt``, and that prefix's length; ``([], 0)`` when none. At least one
        prompt token is always left to prefill: its logits choose the first new token."""
        if not self.enabled:
            return [], 0
        self.lookup_tokens += len(prompt_ids)
        metrics.PREFIX_CACHE_PROMPT_TOKENS.inc(len(prompt_ids))
        best_id, best = None, 0
        limit = len(prompt_ids) - 1
        for entry_id, entry in self._entries.items():
            if entry.salt != salt:
                continue
            shared = _common_prefix(entry.tokens, prompt_ids, min(limit, len(entry.tokens)))
            if shared > best:
                best_id, best = entry_id, shared
        if best_id is None:
            return [], 0
        self._entries.move_to_end(best_id)
        self.hit_tokens += best
        metrics.PREFIX_CACHE_HIT_TOKENS.inc(best)
        metrics.PREFIX_CACHE_HITS.inc()
        layers = [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_id].layers]
        return layers, best

    def store(self, salt: str, token_ids: list[int], layers: list[LayerKV]) -> None:
        """Keep ``layers`` (tensors this cache may own; nobody may write into them later) as
        the cache of ``token_ids``. Entries it extends are dropped: it serves them too."""
        if not self.enabled or not token_ids:
            return
        nbytes = sum(k.nelement() * k.element_size() + v.nelement() * v.element_size() for k, v in layers)
        if nbytes > self.capacity_bytes:
            return
        for entry_id, entry in list(self._entries.items()):
            covered = len(entry.tokens) <= len(token_ids) and entry.salt == salt
            if covered and _common_prefix(entry.tokens, token_ids, len(entry.tokens)) == len(entry.tokens):
                self._drop(entry_id)
        self._entries[self._next_id] = _Entry(salt, list(token_ids), layers, nbytes)
        self._next_id += 1
        self.nbytes += nbytes
        while self.nbytes > self.capacity_bytes:
            self._drop(next(iter(self._entries)))
        metrics.PREFIX_CACHE_BYTES.set(self.nbytes)

    def _drop(self, entry_id: int) -> None:
        self.nbytes -= self._entries.pop(entry_id).nbytes


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``: a binary search
    over slice comparisons, which run in C (a token-by-token loop over a long history
    cost milliseconds per entry)."""
    if limit <= 0:
        return 0
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low
