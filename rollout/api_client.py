"""The one OpenAI-compatible client of the project: retries, on-disk cache, usage, concurrency.

Both remote models go through it: the API teacher (`rollout.remote_teacher.OpenAICompatibleTeacher`,
`/v1/completions`) and the LLM judge (`eval.judge.OpenAIJudge`, `/v1/chat/completions`).
HTTP itself is the `openai` Python client, built as
`openai.OpenAI(base_url=..., api_key=..., max_retries=0, timeout=...)`: the client's own
retries are off, so that the policy below is the only one, shared and testable.

Azure OpenAI. Its v1 endpoint (`https://X.openai.azure.com/openai/v1`) is an ordinary
OpenAI-compatible base URL. A classic deployment is addressed as
`{resource}/openai/deployments/{name}/chat/completions?api-version={version}` with the key in
an `api-key` header; for it the client is `openai.AzureOpenAI(azure_endpoint=resource,
azure_deployment=name, api_version=version, ...)`, which builds exactly that. It is chosen when
an api-version is known, given either as options (`azure_api_version`, `azure_deployment`; on
the command line `--azure-api-version`, `--azure-deployment`) or in the base URL, in the form
the Azure portal shows: `https://X.openai.azure.com/openai/deployments/NAME?api-version=V`
(a trailing `/chat/completions` or `/completions` before the `?` is accepted too). An option
and the URL that disagree are an error, as is any other query parameter in a base URL (the
`openai` client would paste the endpoint's path after the query). Without a deployment
(`https://X.openai.azure.com?api-version=V`) each request's `model` names the deployment.
The key comes from `api_key_env` as for any server (e.g. `--api-key-env AZURE_OPENAI_API_KEY`);
Entra ID tokens are not supported.

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
endpoint, request parameters, the caller's `cache_tag`}, plus the api-version for Azure; the
parameters never contain the API key (it travels in a header that is not part of the key).
For a classic Azure deployment the base URL of the key is `{resource}/openai/deployments/{name}`
whichever way it was given, because the deployment, not the request's `model`, picks the
model. Every request parameter is part of the key, so a changed temperature or token limit
(or a renamed field: `max_tokens` became `max_completion_tokens`) never reuses a reply.
What is stored is the value `extract` returned, not the raw body: a teacher keeps only the
response positions of a 10k-token transcript prompt. `cache_tag` names what `extract` keeps (e.g. the prompt length),
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

Generation parameters (`generation_params`, shared by the judge and data.synth): the token
limit is sent as `max_completion_tokens`, OpenAI's current name, which reasoning models
(o-series, GPT-5) require and vLLM and rollout.server accept (`max_tokens` is rejected by
reasoning models with HTTP 400). A temperature of None is not sent at all: reasoning models
accept only their default, and answer HTTP 400 to any explicit value; such a 400 is raised
with that hint. On the command line, `none` is the value for "not sent".
"""
from __future__ import annotations

import argparse
import datetime
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import openai

from model.safeio import atomic_write_text

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


@dataclass(frozen=True)
class AzureTarget:
    """A classic Azure OpenAI deployment (see the module docstring)."""

    endpoint: str  # the resource, e.g. https://X.openai.azure.com (without /openai)
    api_version: str
    deployment: str | None  # None: each request's `model` names the deployment

    @property
    def public_base(self) -> str:
        """The base URL the requests go to, without credentials or query (cache keys, messages)."""
        base = public_url(self.endpoint) + "/openai"
        return base if self.deployment is None else f"{base}/deployments/{self.deployment}"


_AZURE_DEPLOYMENT_PATH = re.compile(r"(.*?)/openai/deployments/([^/]+)(?:/chat/completions|/completions)?/*")


def azure_target(base_url: str, api_version: str | None = None, deployment: str | None = None) -> AzureTarget | None:
    """The classic Azure deployment that `base_url` and the options name; None for any other server.

    ValueError, naming what to change, for a query parameter other than api-version, for an
    option that disagrees with the URL, and for a deployment without an api-version.
    """
    parts = urlsplit(base_url)
    shown = public_url(base_url)
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(name for name in query if name != "api-version")
    if unknown:
        raise ValueError(
            f"base URL {shown}: query parameter(s) {', '.join(unknown)} are not understood; the only one accepted "
            "is api-version (a classic Azure OpenAI deployment, https://X.openai.azure.com/openai/deployments/"
            "NAME?api-version=V); remove the others")
    url_version = query["api-version"][-1].strip() if "api-version" in query else None
    if url_version == "":
        raise ValueError(f"base URL {shown}: api-version is empty; write ?api-version=V (e.g. 2024-10-21)")
    match = _AZURE_DEPLOYMENT_PATH.fullmatch(parts.path)
    if match:
        prefix, url_deployment = match.group(1), unquote(match.group(2))
    else:
        prefix, url_deployment = parts.path.rstrip("/"), None
        prefix = prefix[: -len("/openai")] if prefix.endswith("/openai") else prefix
    for what, option, in_url, flag in (("api-version", api_version, url_version, "the api-version option"),
                                       ("deployment", deployment, url_deployment, "the deployment option")):
        if option is not None and in_url is not None and option != in_url:
            raise ValueError(f"base URL {shown}: its {what} {in_url!r} differs from {flag} {option!r}; give it once")
    version = api_version if api_version is not None else url_version
    name = deployment if deployment is not None else url_deployment
    if version is None:
        if name is None:
            return None
        raise ValueError(
            f"base URL {shown}: the Azure deployment {name!r} needs an api-version; add ?api-version=V to the base "
            "URL or pass --azure-api-version V (eval.run: --judge-azure-api-version; e.g. 2024-10-21), or use "
            "Azure's v1 endpoint https://X.openai.azure.com/openai/v1 without a deployment")
    if not version.strip() or (name is not None and not name.strip()):
        raise ValueError(f"base URL {shown}: the Azure api-version and deployment must not be empty")
    if re.search(r"/v1$", prefix):
        raise ValueError(
            f"base URL {shown}: a base URL ending in /v1 (Azure's v1 endpoint, or OpenAI's) takes neither an "
            "api-version nor a deployment; drop them, or give the Azure resource URL https://X.openai.azure.com "
            "with them")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base URL {shown}: expected http(s)://HOST/..., e.g. https://X.openai.azure.com")
    return AzureTarget(urlunsplit((parts.scheme, parts.netloc, prefix, "", "")), version, name)


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
        text = json.dumps({"format": CACHE_FORMAT, "key": key, "value": value}, separators=(",", ":"))
        atomic_write_text(self.path(key), text)

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
        azure_api_version: str | None = None,
        azure_deployment: str | None = None,
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
        self.azure = azure_target(base_url, azure_api_version, azure_deployment)
        self._public_base = public_url(base_url) if self.azure is None else self.azure.public_base
        api_key = _read_api_key(api_key_env)
        if self.azure is None:
            self._openai = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        else:  # everything explicit: AzureOpenAI would otherwise read AZURE_OPENAI_* variables
            self._openai = openai.AzureOpenAI(
                azure_endpoint=self.azure.endpoint, azure_deployment=self.azure.deployment,
                api_version=self.azure.api_version, api_key=api_key, max_retries=0, timeout=timeout_s,
            )

    def __repr__(self) -> str:
        cache = None if self.cache is None else str(self.cache.directory)
        return (f"ApiClient(base_url={self._public_base!r}, api_key_env={self.api_key_env!r}, "
                f"max_concurrency={self.max_concurrency}, cache_dir={cache!r})")

    def config(self) -> dict[str, Any]:
        """What a run records about this client: names only, never the key's value."""
        config = {
            "base_url": self._public_base,
            "api_key_env": self.api_key_env,
            "timeout_s": self.timeout_s,
            "max_concurrency": self.max_concurrency,
            "retry": asdict(self.retry),
            "cache_dir": None if self.cache is None else str(self.cache.directory),
        }
        if self.azure is not None:  # only then: other servers' configs stay as they were
            config.update(azure_api_version=self.azure.api_version, azure_deployment=self.azure.deployment)
        return config

    @property
    def usage(self) -> Usage:
        """A snapshot of the counters."""
        with self._usage_lock:
            return Usage(**asdict(self._usage))

    def cache_key(self, request: ApiRequest) -> str:
        payload = {
            "base_url": self._public_base,
            "endpoint": request.endpoint,
            "params": request.params,
            "tag": request.cache_tag,
        }
        if self.azure is not None:  # only then: the keys of other servers' caches stay as they were
            payload["api_version"] = self.azure.api_version
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
        where = f"{self._public_base}/{request.endpoint.replace('.', '/')}"
        failures: list[str] = []
        started = time.monotonic()
        for attempt in range(self.retry.max_attempts):
            retry_after = None
            try:
                body = self._send(request)
                value = request.extract(body)
                self._count_tokens(body)
                return value
            except openai.APIStatusError as error:
                status, message = error.status_code, self._redact(_server_message(error))
                retryable = _should_retry(error.response.headers)
                if retryable is None:
                    retryable = status in RETRYABLE_STATUS or status >= 500
                if not retryable:
                    raise EndpointError(
                        f"{where} answered HTTP {status}: {message}{_parameter_hint(status, message, request)}",
                        status_code=status, endpoint=where, server_message=message,
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
            f"{where}: all {self.retry.max_attempts} attempts failed in {time.monotonic() - started:.0f} s: "
            + "; ".join(f"#{i + 1} {failure}" for i, failure in enumerate(failures))
            + ". Check that the server is up and not overloaded, or change the attempts / timeout "
              "(RetryPolicy.max_attempts and timeout_s; kd.max_attempts and kd.timeout_s in a KD config)"
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


def _read_api_key(api_key_env: str | None) -> str:
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


def _parameter_hint(status: int, message: str, request: ApiRequest) -> str:
    """What to do when a model refuses a generation parameter (reasoning models refuse a temperature)."""
    if status == 400 and "temperature" in request.params and "temperature" in message.lower():
        return (" (reasoning models such as the o-series and GPT-5 accept only their default temperature: leave "
                "the temperature unset, `none` on the command line)")
    return ""


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
    """The server's wait, as the openai SDK reads it: `retry-after-ms` (milliseconds, Azure and
    OpenAI send it), else `retry-after` in seconds or as an HTTP date; None when absent or bad."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            value = float(milliseconds) / 1000
            return value if math.isfinite(value) and value >= 0 else None
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.datetime.now(datetime.timezone.utc)
                       ).total_seconds()
        except (TypeError, ValueError):
            return None
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _should_retry(headers) -> bool | None:
    """`x-should-retry: true|false` overrides the status's own verdict (OpenAI's servers send it)."""
    value = (headers.get("x-should-retry") or "").strip().lower() if headers is not None else ""
    return {"true": True, "false": False}.get(value)


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
    group.add_argument("--azure-api-version", help="a classic Azure OpenAI deployment's api-version (e.g. "
                       "2024-10-21), with --base-url https://X.openai.azure.com; or put ?api-version= in --base-url")
    group.add_argument("--azure-deployment", help="the classic Azure deployment's name (default: the model name)")


def client_options(args, default_cache_dir: str) -> dict[str, Any]:
    """ApiClient keyword arguments from `add_client_arguments`' options (the key stays in the environment)."""
    return {"api_key_env": args.api_key_env or None, "timeout_s": args.timeout,
            "max_concurrency": args.concurrency, "cache_dir": args.cache_dir or default_cache_dir,
            "azure_api_version": args.azure_api_version or None, "azure_deployment": args.azure_deployment or None}
