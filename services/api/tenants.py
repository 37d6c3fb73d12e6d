"""Tenants: who shares the generation permits, and on what terms (``TENANTS_FILE``).

A YAML file names the tenants, the API keys of each, and their terms: ``weight``
(their share of the permits while several tenants wait), ``priority``
(``interactive`` before ``batch``), ``max_concurrent`` and ``max_queued``
(cluster-wide caps, enforced by the semaphore's script) and ``tokens_per_minute``.
Requests made with any other key (``API_KEYS``, ``API_KEYS_FILE``), or without one
when no key is configured at all, belong to the ``default`` tenant, whose terms
the file's ``default:`` section sets::

    tenants:
      search:
        keys: ["sk-search-1", "sha256:9f86d0..."]   # plain keys or SHA-256 digests
        weight: 3
        max_concurrent: 8
        max_queued: 32
        tokens_per_minute: 200000
      batch-jobs:
        keys: ["sk-batch-1"]
        priority: batch
    default:
      weight: 1

The file is re-read when it changes (a mounted Secret or ConfigMap being
updated); a file that does not parse or validate is refused at start-up with a
message that says what is wrong, and on a reload the previous tenants stay, with
a log line. Keys are kept only as SHA-256 digests and never logged; a tenant is
named in metrics and spans by its name, never by its key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.semaphore import DEFAULT_TENANT, Priority, TenantShare

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_TERMS = {"weight", "priority", "max_concurrent", "max_queued", "tokens_per_minute"}


class TenantsError(ValueError):
    """The tenants file cannot be read or is not valid (the message says where)."""


@dataclass(frozen=True)
class Tenant:
    """One tenant's terms: its share of the semaphore and its token quota (0 = none)."""

    share: TenantShare = DEFAULT_TENANT
    tokens_per_minute: int = 0
    key_digests: frozenset[bytes] = field(default=frozenset(), repr=False)

    @property
    def name(self) -> str:
        return self.share.name


DEFAULT = Tenant()


def key_digest(key: str) -> bytes:
    """How a key is kept and looked up."""
    return hashlib.sha256(key.encode()).digest()


def _number(where: str, value: Any, *, integer: bool, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "a whole number" if integer else "a number"
        raise TenantsError(f"{where} must be {kind}, not {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise TenantsError(f"{where} must be {'greater than 0' if positive else '0 or more'}, not {value!r}")
    return value


def _terms(name: str, section: dict[str, Any], where: str, keys: frozenset[bytes] = frozenset()) -> Tenant:
    unknown = sorted(set(section) - _TERMS - ({"keys"} if where.startswith("tenants.") else set()))
    if unknown:
        raise TenantsError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_TERMS))})")
    priority = section.get("priority", Priority.INTERACTIVE.value)
    if priority not in {p.value for p in Priority}:
        raise TenantsError(f"{where}.priority must be interactive or batch, not {priority!r}")
    share = TenantShare(
        name=name,
        weight=float(_number(f"{where}.weight", section.get("weight", 1), integer=False, positive=True)),
        priority=Priority(priority),
        max_concurrent=int(_number(f"{where}.max_concurrent", section.get("max_concurrent", 0), integer=True)),
        max_queued=int(_number(f"{where}.max_queued", section.get("max_queued", 0), integer=True)),
    )
    tokens_per_minute = int(_number(f"{where}.tokens_per_minute", section.get("tokens_per_minute", 0), integer=True))
    return Tenant(share, tokens_per_minute, keys)


def _keys(where: str, value: Any, seen: dict[bytes, str]) -> frozenset[bytes]:
    if not isinstance(value, list) or not value:
        raise TenantsError(f"{where}.keys must be a non-empty list of keys")
    digests = set()
    for i, key in enumerate(value):
        if not isinstance(key, str) or not key.strip():
            raise TenantsError(f"{where}.keys[{i}] must be a key (a string) or sha256:<64 hex digits>")
        match = _DIGEST.match(key.strip())
        digest = bytes.fromhex(match.group(1)) if match else key_digest(key.strip())
        if digest in seen:
            # Which key is never said: only where it was listed before.
            raise TenantsError(f"{where}.keys[{i}] is listed twice (also under {seen[digest]})")
        seen[digest] = where
        digests.add(digest)
    return frozenset(digests)


def parse_tenants(text: str) -> tuple[dict[str, Tenant], Tenant]:
    """The tenants of a file's text, and the default tenant; :class:`TenantsError`
    when it is not valid."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TenantsError(f"not valid YAML: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise TenantsError("the file must be a mapping with `tenants:` (and optionally `default:`)")
    unknown = sorted(set(document) - {"tenants", "default"})
    if unknown:
        raise TenantsError(f"unknown top-level field(s) {', '.join(map(str, unknown))} (known: default, tenants)")
    sections = document.get("tenants") or {}
    if not isinstance(sections, dict):
        raise TenantsError("`tenants:` must map tenant names to their terms")
    seen: dict[bytes, str] = {}
    tenants: dict[str, Tenant] = {}
    for name, section in sections.items():
        where = f"tenants.{name}"
        if not isinstance(name, str) or not _NAME.match(name) or name == DEFAULT.name:
            raise TenantsError(
                f"tenant name {name!r}: letters, digits, '_', '.', '-' (at most 63, not 'default')"
            )
        if not isinstance(section, dict):
            raise TenantsError(f"{where} must be a mapping of its terms")
        tenants[name] = _terms(name, section, where, _keys(where, section.get("keys"), seen))
    default_section = document.get("default") or {}
    if not isinstance(default_section, dict):
        raise TenantsError("`default:` must be a mapping of its terms")
    return tenants, _terms(DEFAULT.name, default_section, "default")


class Tenants:
    """The configured tenants (none without ``TENANTS_FILE``: everyone is ``default``),
    looked up by a request's API key; the file is re-read when it changes."""

    def __init__(self, file: str | Path | None = None) -> None:
        self._file = Path(file) if file else None
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[bytes, Tenant] = {}
        self.by_name: dict[str, Tenant] = {}
        self.default = DEFAULT
        if self._file is not None:
            try:
                stat = os.stat(self._file)
                text = self._file.read_text()
            except OSError as exc:
                raise TenantsError(f"TENANTS_FILE {str(self._file)!r} cannot be read: {exc.strerror}") from None
            try:
                self._install(parse_tenants(text), stat)
            except TenantsError as exc:
                raise TenantsError(f"TENANTS_FILE {str(self._file)!r}: {exc}") from None

    def _install(self, parsed: tuple[dict[str, Tenant], Tenant], stat: os.stat_result) -> None:
        tenants, default = parsed
        self.by_name = tenants
        self.default = default
        self._by_digest = {digest: tenant for tenant in tenants.values() for digest in tenant.key_digests}
        self._stamp = (stat.st_mtime_ns, stat.st_ino)

    def _refresh(self) -> None:
        if self._file is None:
            return
        try:
            stat = os.stat(self._file)
            if (stat.st_mtime_ns, stat.st_ino) == self._stamp:
                return
            parsed = parse_tenants(self._file.read_text())
        except OSError as exc:
            # A Secret being swapped may vanish for a moment: keep what was read.
            logger.warning("re-reading TENANTS_FILE failed (%s); keeping the previous tenants", exc.strerror)
            return
        except TenantsError as exc:
            self._stamp = (stat.st_mtime_ns, stat.st_ino)  # said once, not on every request
            logger.error("TENANTS_FILE %s is not valid (%s); keeping the previous tenants", self._file, exc)
            return
        self._install(parsed, stat)
        logger.info("TENANTS_FILE %s re-read: %d tenants", self._file, len(self.by_name))

    @property
    def has_keys(self) -> bool:
        """Whether some tenant has keys (requests must then present one)."""
        self._refresh()
        return bool(self._by_digest)

    def knows(self, token: str) -> bool:
        """Whether ``token`` is a tenant's key."""
        self._refresh()
        return key_digest(token) in self._by_digest

    def for_token(self, token: str | None) -> Tenant:
        """The tenant of a request made with ``token`` (None: no key): ``default``
        unless it is one of a tenant's keys."""
        self._refresh()
        if token is None:
            return self.default
        return self._by_digest.get(key_digest(token), self.default)
