"""Secrets: the API key is named by an environment variable, read once, and never shown.

The client takes the variable's *name* so that a key never sits in a config, a log or a cache;
these helpers check that name (a pasted key is refused without being repeated), read the value,
redact it from server messages, and drop credentials from URLs shown in messages and cache keys.
The rules in full: docs/api-client.md, "Secrets".
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

NO_AUTH_PLACEHOLDER = "EMPTY"  # what vLLM's docs pass for a server started without --api-key
MAX_MESSAGE_CHARS = 500

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_name_problem(api_key_env: str) -> str | None:
    """Why `api_key_env` cannot be the *name* of an environment variable, or None when it can.
    A key pasted in its place is described, never repeated (it must not reach a log)."""
    if _ENV_NAME.fullmatch(api_key_env):
        if api_key_env.startswith(("sk-", "sk_")) or (len(api_key_env) >= 32 and any(c.isdigit() for c in api_key_env)
                                                     and any(c.islower() for c in api_key_env)):
            return ("it looks like a key, not a variable name; put the key in an environment variable "
                    "(export OPENAI_API_KEY=...) and give that variable's name")
        return None
    if api_key_env.startswith("sk-") or len(api_key_env) >= 20:
        return ("that looks like a key, not a variable name (it is not repeated here); put the key in an environment "
                "variable (export OPENAI_API_KEY=...) and give that variable's name")
    return (f"it is not a valid environment variable name ({len(api_key_env)} characters; letters, digits and _ "
            "only, not starting with a digit)")


def read_api_key(api_key_env: str | None) -> str:
    """The key's value from the variable `api_key_env` names; the placeholder for None (no auth)."""
    if api_key_env is None:
        return NO_AUTH_PLACEHOLDER
    problem = env_name_problem(api_key_env)
    if problem is not None:
        raise ValueError(f"api_key_env: {problem}")
    value = os.environ.get(api_key_env)
    if not value:
        raise ValueError(
            f"the environment variable {api_key_env} (api_key_env) is not set or empty; export the API key "
            "under that name, or pass api_key_env=None for a server that needs no key (a local vLLM or "
            "python -m rollout.server without --api-key-env)"
        )
    return value


def redact(text: str, secret: str | None) -> str:
    """`text` (a server message) with `secret` replaced, cut to MAX_MESSAGE_CHARS for logs and errors."""
    if secret and secret != NO_AUTH_PLACEHOLDER:
        text = text.replace(secret, "[REDACTED]")
    return text[:MAX_MESSAGE_CHARS]


def public_url(url: str) -> str:
    """`url` without user:password and without a query string (either may hold a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
