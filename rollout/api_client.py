"""The one OpenAI-compatible client of the project: retries, on-disk cache, usage, concurrency.

Both remote models go through it: the API teacher (`rollout.teachers.OpenAICompatibleTeacher`,
`/v1/completions`) and the LLM judge (`eval.judge.OpenAIJudge`, `/v1/chat/completions`).
HTTP itself is the `openai` Python client, built as
`openai.OpenAI(base_url=..., api_key=..., max_retries=0, timeout=...)`: the client's own
retries are off, so that the policy below is the only one, shared and testable.

    client = ApiClient("http://127.0.0.1:8000/v1", api_key_env=None, cache_dir="runs/teacher_cache")
    value = client.call(ApiRequest("completions", {"model": "m", "prompt": [1, 2, 3]}, extract=my_extract))

Retries (`RetryPolicy`). Retried: HTTP 408, 409, 429 and every 5xx, timeouts, connection
errors, and 2xx bodies that are not the JSON the caller expects (`MalformedResponseError`,
raised by the body parser or by `extract`; proxies and overloaded servers produce these).
Retry n (0-based) waits `min(max_backoff_s, initial_backoff_s * multiplier**n)` scaled by a
random factor in [1 - jitter, 1] ("equal jitter"), or the server's `Retry-After` seconds when
that is longer (still capped at max_backoff_s). After `max_attempts` attempts,
`RetriesExhaustedError` names the endpoint and every failure. Other 4xx answers are the
caller's mistake and raise `EndpointError` at once, with the server's message.

Cache (`ResponseCache`): content-addressed, one JSON file per entry. The key is the sha256 of
the canonical JSON (sorted keys, no whitespace) of {base_url without credentials or query,
endpoint, request parameters, the caller's `cache_tag`}; the parameters never contain the API
key (it travels in a header that is not part of the key). What is stored is the value
`extract` returned, not the raw body: a teacher keeps only the response positions of a
10k-token transcript prompt. `cache_tag` names what `extract` keeps (e.g. the prompt length),
so two extractions of one request never share an entry. Each entry is written to a unique
temporary file in the same directory, flushed, fsync'ed and renamed over
`{dir}/{key[:2]}/{key}.json` (rename is atomic on POSIX), so a process killed at any moment
leaves either the complete entry or no entry, plus at worst a stray `.*.tmp` file that readers
ignore. An entry that does not parse (a copy made outside this module, a full disk) is
reported once as a warning and treated as a miss, then rewritten. Because the base URL is part
of the key, a server moved to another host or port starts a fresh cache. Entries never expire:
delete the directory to re-query. Failed calls are never cached.

Usage (`Usage`): requests sent (every attempt), retries, calls that gave up, cache hits and
misses, and the prompt / completion tokens the server reported (cache hits cost nothing and
add none). Thread-safe.

Concurrency: `map` runs requests on a thread pool of `max_concurrency` workers, and a
semaphore bounds the HTTP requests in flight across every thread using this client.

Secrets: the client takes the *name* of an environment variable (`api_key_env`) and reads
its value once, when it builds the openai client. The value is kept only inside that openai
client: it is not an attribute of ApiClient, not in `repr`, `config()`, logs, cache keys or
cache files, and any server message that echoes it is redacted before it is logged or raised.
`api_key_env=None` is for servers without authentication (a local vLLM or `rollout.server`):
the openai client then sends the placeholder key "EMPTY".
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import openai

logger = logging.getLogger(__name__)

ENDPOINTS = ("completions", "chat.completions")
RETRYABLE_STATUS = frozenset({408, 409, 429})
NO_AUTH_PLACEHOLDER = "EMPTY"  # what vLLM's docs pass for a server started without --api-key
CACHE_FORMAT = 1
MAX_MESSAGE_CHARS = 500


class ApiError(RuntimeError):
    """Base class of every error this module raises."""


class EndpointError(ApiError):
    """The server refused the request with a status that retrying cannot fix (4xx other than 408/409/429)."""

    def __init__(self, message: str, *, status_code: int, endpoint: str, server_message: str):
        super().__init__(message)
        self.status_code = status_code
        self.endpoint = endpoint
        self.server_message = server_message


class MalformedResponseError(ApiError):
    """A successful status with a body that is not the expected JSON; retried like a 5xx."""


class RetriesExhaustedError(ApiError):
    """Every attempt failed with a retryable error."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter; see the module docstring."""

    max_attempts: int = 8
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each delay that is random: delay * U[1 - jitter, 1]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s or self.multiplier < 1:
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s and multiplier >= 1, got "
                f"{self.initial_backoff_s}, {self.max_backoff_s}, {self.multiplier}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must lie in [0, 1], got {self.jitter}")

    def ceiling(self, retry_index: int) -> float:
        """The longest wait before retry `retry_index` (0-based), without Retry-After."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry_index)

    def delay(self, retry_index: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        ceiling = self.ceiling(retry_index)
        delay = ceiling * (1.0 - self.jitter * rng.random())
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_backoff_s))
        return delay


@dataclass
class Usage:
    """Counters of one ApiClient (see the module docstring)."""

    requests: int = 0  # HTTP requests sent, every attempt counted
    retries: int = 0  # attempts that failed with a retryable error and were retried
    failed_calls: int = 0  # calls that raised (retries exhausted or a non-retryable error)
    cache_hits: int = 0
    cache_misses: int = 0
    prompt_tokens: int = 0  # as reported by the server's "usage" field
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ApiRequest:
    """One call: `endpoint` is "completions" or "chat.completions"; `params` are the keyword
    arguments of the openai client's `create` (non-standard fields go in `params["extra_body"]`).

    `extract(body)` turns the parsed JSON body into the JSON-serialisable value that is returned
    and cached; it raises MalformedResponseError for a body worth retrying, any other exception
    to fail the call at once. `cache_tag` (JSON-serialisable) names what `extract` keeps.
    """

    endpoint: str
    params: dict[str, Any]
    extract: Callable[[dict[str, Any]], Any]
    cache_tag: Any = None


# ---------------------------------------------------------------------------------------------
# cache


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def public_url(url: str) -> str:
    """`url` without user:password and without a query string (either may hold a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


class ResponseCache:
    """Content-addressed, crash-safe, one JSON file per entry (see the module docstring)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._warned: set[str] = set()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, value) for a complete entry; (False, None) for a missing or unreadable one."""
        path = self.path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False, None
        try:
            entry = json.loads(text)
            if entry.get("format") != CACHE_FORMAT or entry.get("key") != key or "value" not in entry:
                raise ValueError("not a speechsum cache entry for this key")
        except (ValueError, AttributeError) as error:
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("cache entry %s is unreadable (%s); treating it as a miss", path, error)
            return False, None
        return True, entry["value"]

    def put(self, key: str, value: Any) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": CACHE_FORMAT, "key": key, "value": value}, separators=(",", ":"))
        handle, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as tmp:
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def keys(self) -> list[str]:
        """Keys of the complete-looking entries (temporary files of interrupted writes excluded)."""
        return sorted(p.stem for p in self.directory.glob("??/*.json") if not p.name.startswith("."))

    def __len__(self) -> int:
        return len(self.keys())


# ---------------------------------------------------------------------------------------------
# client


class ApiClient:
    """OpenAI-compatible HTTP with the project's retry, cache, usage and concurrency policy."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_concurrency: int = 8,
        retry: RetryPolicy = RetryPolicy(),
        cache_dir: str | Path | None = None,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_concurrency < 1:
            raise ValueError(f"ApiClient: max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.retry = retry
        self.cache = None if cache_dir is None else ResponseCache(cache_dir)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._usage = Usage()
        self._usage_lock = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(max_concurrency)
        self._openai = openai.OpenAI(
            base_url=base_url, api_key=_read_api_key(api_key_env), max_retries=0, timeout=timeout_s
        )

    def __repr__(self) -> str:
        cache = None if self.cache is None else str(self.cache.directory)
        return (f"ApiClient(base_url={public_url(self.base_url)!r}, api_key_env={self.api_key_env!r}, "
                f"max_concurrency={self.max_concurrency}, cache_dir={cache!r})")

    def config(self) -> dict[str, Any]:
        """What a run records about this client: names only, never the key's value."""
        return {
            "base_url": public_url(self.base_url),
            "api_key_env": self.api_key_env,
            "timeout_s": self.timeout_s,
            "max_concurrency": self.max_concurrency,
            "retry": asdict(self.retry),
            "cache_dir": None if self.cache is None else str(self.cache.directory),
        }

    @property
    def usage(self) -> Usage:
        """A snapshot of the counters."""
        with self._usage_lock:
            return Usage(**asdict(self._usage))

    def cache_key(self, request: ApiRequest) -> str:
        payload = {
            "base_url": public_url(self.base_url),
            "endpoint": request.endpoint,
            "params": request.params,
            "tag": request.cache_tag,
        }
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()

    # -----------------------------------------------------------------------------------------

    def call(self, request: ApiRequest) -> Any:
        """The extracted value of one request: from the cache, or over HTTP with retries."""
        if request.endpoint not in ENDPOINTS:
            raise ValueError(f"ApiRequest.endpoint must be one of {ENDPOINTS}, got {request.endpoint!r}")
        key = self.cache_key(request)
        if self.cache is not None:
            hit, value = self.cache.get(key)
            self._count(cache_hits=int(hit), cache_misses=int(not hit))
            if hit:
                return value
        try:
            value = self._call_with_retries(request)
        except BaseException:
            self._count(failed_calls=1)
            raise
        if self.cache is not None:
            self.cache.put(key, value)
        return value

    def map(self, requests: Sequence[ApiRequest]) -> list[Any]:
        """`call` over many requests, at most `max_concurrency` at a time; results in order.

        The first failure cancels the requests not yet started and is raised once the running
        ones finish; everything that succeeded is already cached, so a rerun resumes.
        """
        requests = list(requests)
        if len(requests) <= 1 or self.max_concurrency == 1:
            return [self.call(request) for request in requests]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            futures = [pool.submit(self.call, request) for request in requests]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                raise failed.exception()
            return [future.result() for future in futures]

    # -----------------------------------------------------------------------------------------

    def _call_with_retries(self, request: ApiRequest) -> Any:
        where = f"{public_url(self.base_url)}/{request.endpoint.replace('.', '/')}"
        failures: list[str] = []
        for attempt in range(self.retry.max_attempts):
            retry_after = None
            try:
                body = self._send(request)
                value = request.extract(body)
                self._count_tokens(body)
                return value
            except openai.APIStatusError as error:
                status, message = error.status_code, self._redact(_server_message(error))
                if status not in RETRYABLE_STATUS and status < 500:
                    raise EndpointError(
                        f"{where} answered HTTP {status}: {message}", status_code=status, endpoint=where,
                        server_message=message,
                    ) from None
                failure = f"HTTP {status}: {message}"
                retry_after = _retry_after_seconds(error.response.headers)
            except openai.APITimeoutError:
                failure = f"timed out after {self.timeout_s} s"
            except openai.APIConnectionError as error:
                failure = f"connection error ({self._redact(str(error.__cause__ or error))})"
            except MalformedResponseError as error:
                failure = f"malformed response ({self._redact(str(error))})"
            failures.append(failure)
            if attempt + 1 == self.retry.max_attempts:
                break
            with self._rng_lock:
                delay = self.retry.delay(attempt, self._rng, retry_after)
            self._count(retries=1)
            logger.warning("%s attempt %d/%d failed: %s; retrying in %.2f s",
                           where, attempt + 1, self.retry.max_attempts, failure, delay)
            self._sleep(delay)
        raise RetriesExhaustedError(
            f"{where}: all {self.retry.max_attempts} attempts failed: " + "; ".join(
                f"#{i + 1} {failure}" for i, failure in enumerate(failures))
            + ". Check that the server is up and not overloaded, or raise RetryPolicy.max_attempts / timeout_s"
        )

    def _send(self, request: ApiRequest) -> dict[str, Any]:
        resource = self._openai.completions if request.endpoint == "completions" else self._openai.chat.completions
        with self._in_flight:
            self._count(requests=1)
            raw = resource.with_raw_response.create(**request.params)
            text = raw.http_response.text
        try:
            body = json.loads(text)
        except ValueError:
            raise MalformedResponseError(f"the body is not JSON: {text[:200]!r}") from None
        if not isinstance(body, dict):
            raise MalformedResponseError(f"the body is JSON but not an object: {text[:200]!r}")
        return body

    def _count(self, **increments: int) -> None:
        with self._usage_lock:
            for name, value in increments.items():
                setattr(self._usage, name, getattr(self._usage, name) + value)

    def _count_tokens(self, body: dict[str, Any]) -> None:
        usage = body.get("usage")
        if isinstance(usage, dict):
            self._count(prompt_tokens=_int_or_zero(usage.get("prompt_tokens")),
                        completion_tokens=_int_or_zero(usage.get("completion_tokens")))

    def _redact(self, text: str) -> str:
        secret = self._openai.api_key
        if secret and secret != NO_AUTH_PLACEHOLDER:
            text = text.replace(secret, "[REDACTED]")
        return text[:MAX_MESSAGE_CHARS]


def _read_api_key(api_key_env: str | None) -> str:
    if api_key_env is None:
        return NO_AUTH_PLACEHOLDER
    value = os.environ.get(api_key_env)
    if not value:
        raise ValueError(
            f"the environment variable {api_key_env} (api_key_env) is not set or empty; export the API key "
            "under that name, or pass api_key_env=None for a server that needs no key (a local vLLM or "
            "python -m rollout.server without --api-key-env)"
        )
    return value


def _server_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
    return str(error.message)


def _retry_after_seconds(headers) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: ignore it and use the backoff
    return seconds if seconds >= 0 else None


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def add_client_arguments(parser, *, concurrency: int = 8, timeout: float = 120.0) -> None:
    """The command-line options of every tool that talks to an OpenAI-compatible endpoint."""
    group = parser.add_argument_group("OpenAI-compatible endpoint")
    group.add_argument("--base-url", default="https://api.openai.com/v1")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="name of the environment variable holding the key; '' for a server without auth")
    group.add_argument("--cache-dir", help="response cache (default: OUT.cache)")
    group.add_argument("--concurrency", type=int, default=concurrency, help="requests in flight at most")
    group.add_argument("--timeout", type=float, default=timeout, help="seconds per request")


def client_options(args, default_cache_dir: str) -> dict[str, Any]:
    """ApiClient keyword arguments from `add_client_arguments`' options (the key stays in the environment)."""
    return {"api_key_env": args.api_key_env or None, "timeout_s": args.timeout,
            "max_concurrency": args.concurrency, "cache_dir": args.cache_dir or default_cache_dir}
