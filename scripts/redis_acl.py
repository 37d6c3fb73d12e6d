"""The Redis ACL users of chatstream, read from their one source,
``helm/chatstream/files/redis-acl.conf`` (rules without passwords).

From code: :func:`users` (name → rules) and :func:`acl_file` (a Redis ACL file with
the passwords added, as ``redis-server --aclfile`` loads it). From the command line,
for an external Redis: ``python scripts/redis_acl.py setuser`` prints one
``ACL SETUSER`` command per chatstream user, with the passwords taken from
``REDIS_API_PASSWORD``, ``REDIS_GENERATOR_PASSWORD`` and ``REDIS_KEDA_PASSWORD``;
pipe it into ``redis-cli`` run as an administrator of that Redis.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

RULES_FILE = Path(__file__).resolve().parents[1] / "helm" / "chatstream" / "files" / "redis-acl.conf"

#: Each component's user, and the environment variable the CLI reads its password from.
PASSWORD_ENV = {
    "chatstream-api": "REDIS_API_PASSWORD",
    "chatstream-generator": "REDIS_GENERATOR_PASSWORD",
    "chatstream-keda": "REDIS_KEDA_PASSWORD",
}


def users(text: str | None = None) -> dict[str, str]:
    """User name → its rules, in file order (``default`` included)."""
    text = RULES_FILE.read_text() if text is None else text
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("user "):
            _, name, rules = line.split(" ", 2)
            out[name] = rules
    return out


def acl_file(passwords: dict[str, str], only: set[str] | None = None) -> str:
    """A Redis ACL file: ``default`` as written, each user of ``passwords`` switched on
    with its password; users without one (or outside ``only``) are left out."""
    lines = []
    for name, rules in users().items():
        if only is not None and name not in only:
            continue
        if name == "default":
            lines.append(f"user default {rules}")
        elif name in passwords:
            lines.append(f"user {name} on >{passwords[name]} {rules}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``setuser``: print the ACL SETUSER commands for an external Redis."""
    if argv != ["setuser"]:
        print(__doc__, file=sys.stderr)
        return 2
    missing = [env for env in PASSWORD_ENV.values() if not os.environ.get(env)]
    if missing:
        print(f"set {', '.join(missing)} first", file=sys.stderr)
        return 2
    for name, rules in users().items():
        if name in PASSWORD_ENV:
            password = os.environ[PASSWORD_ENV[name]]
            print(" ".join(["ACL", "SETUSER", name, "reset", "on", shlex.quote(">" + password), *rules.split()]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
