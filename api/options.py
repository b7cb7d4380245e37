"""Request options shared by the tools that talk to an endpoint: generation fields and CLI flags.

The judge and data.synth send the same sampling fields (`generation_params`: the token limit as
`max_completion_tokens`, no temperature for None, as reasoning models require), and eval.preferences
and data.synth take the same command-line options (`add_client_arguments`, turned into ApiClient
keyword arguments by `client_options`), so one place decides both. Why these names:
docs/api-client.md, "Generation parameters".
"""
from __future__ import annotations

import argparse
import math
from typing import Any


def generation_params(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    """The chat request's sampling fields: `max_completion_tokens`, and `temperature` unless None."""
    params: dict[str, Any] = {}
    if temperature is not None:
        params["temperature"] = temperature
    if max_tokens is not None:
        params["max_completion_tokens"] = max_tokens
    return params


def check_generation(temperature: float | None, max_tokens: int | None, what: str) -> None:
    """ValueError naming `what` for a temperature outside [0, 2] or a token limit below 1 (None: not sent)."""
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not math.isfinite(temperature) or not 0 <= temperature <= 2):
        raise ValueError(f"{what} temperature must be a number in [0, 2] or None (not sent), got {temperature!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"{what} max tokens must be an integer >= 1 or None (not sent), got {max_tokens!r}")


def optional_temperature(text: str) -> float | None:
    """argparse type: a temperature in [0, 2], or `none` for "not sent"."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 2], or none to send no temperature (reasoning "
                                         f"models), got {text!r}")
    return value


def optional_max_tokens(text: str) -> int | None:
    """argparse type: a token limit >= 1, or `none` for "not sent" (the server's default)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, or none to send no limit, got {text!r}")
    return value


def add_client_arguments(parser, *, concurrency: int = 8, timeout: float = 120.0) -> None:
    """The command-line options of every tool that talks to an OpenAI-compatible endpoint."""
    group = parser.add_argument_group("OpenAI-compatible endpoint")
    group.add_argument("--base-url", default="https://api.openai.com/v1")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="name of the environment variable holding the key; '' for a server without auth")
    group.add_argument("--cache-dir", help="response cache (default: OUT.cache)")
    group.add_argument("--concurrency", type=int, default=concurrency, help="requests in flight at most")
    group.add_argument("--timeout", type=float, default=timeout, help="seconds per request")
    group.add_argument("--azure-api-version", help="a classic Azure OpenAI deployment's api-version (e.g. "
                       "2024-10-21), with --base-url https://X.openai.azure.com; or put ?api-version= in --base-url")
    group.add_argument("--azure-deployment", help="the classic Azure deployment's name (default: the model name)")


def client_options(args, default_cache_dir: str) -> dict[str, Any]:
    """ApiClient keyword arguments from `add_client_arguments`' options (the key stays in the environment)."""
    return {"api_key_env": args.api_key_env or None, "timeout_s": args.timeout,
            "max_concurrency": args.concurrency, "cache_dir": args.cache_dir or default_cache_dir,
            "azure_api_version": args.azure_api_version or None, "azure_deployment": args.azure_deployment or None}
