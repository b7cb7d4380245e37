"""The one OpenAI-compatible client of the project: retries, on-disk cache, usage, concurrency.

Every remote model goes through `ApiClient`: the API teacher of KD (rollout.remote_teacher,
`/v1/completions`), the LLM judges (eval.judge, `/v1/chat/completions`) and data.synth. HTTP is
the `openai` client with its own retries off (`max_retries=0`), so the policy of this package
(api.retry) is the only one, shared and testable; replies go through the response cache
(api.cache), and the API key is read by name and never shown (api.keys).

    client = ApiClient("http://127.0.0.1:8000/v1", api_key_env=None, cache_dir="runs/teacher_cache")
    value = client.call(ApiRequest("completions", {"model": "m", "prompt": [1, 2, 3]}, extract=my_extract))

The protocol (what is retried, what the cache key covers, Azure, secrets): docs/api-client.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import openai

from .azure import azure_target
from .cache import ResponseCache, canonical_json
from .keys import public_url, read_api_key, redact
from .retry import RETRYABLE_STATUS, RetryPolicy, retry_after_seconds, should_retry

logger = logging.getLogger(__name__)

ENDPOINTS = ("completions", "chat.completions")


class ApiError(RuntimeError):
    """Base class of every error this package raises."""


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


@dataclass
class Usage:
    """Counters of one ApiClient (docs/api-client.md, "Usage and concurrency")."""

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
        api_key = read_api_key(api_key_env)
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
        """The sha256 of what picks the reply: base URL (no credentials), endpoint, parameters, tag."""
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
                retryable = should_retry(error.response.headers)
                if retryable is None:
                    retryable = status in RETRYABLE_STATUS or status >= 500
                if not retryable:
                    raise EndpointError(
                        f"{where} answered HTTP {status}: {message}{_parameter_hint(status, message, request)}",
                        status_code=status, endpoint=where, server_message=message,
                    ) from None
                failure = f"HTTP {status}: {message}"
                retry_after = retry_after_seconds(error.response.headers)
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
        return redact(text, self._openai.api_key)


def _parameter_hint(status: int, message: str, request: ApiRequest) -> str:
    """What to do when a model refuses a generation parameter (reasoning models refuse a temperature)."""
    if status == 400 and "temperature" in request.params and "temperature" in message.lower():
        return (" (reasoning models such as the o-series and GPT-5 accept only their default temperature: leave "
                "the temperature unset, `none` on the command line)")
    return ""


def _server_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(body.get("message"), str):
            return body["message"]
        if "detail" in body:  # FastAPI: {"detail": "text"} or pydantic's [{"type", "loc", "msg"}, ...]
            return _detail_text(body["detail"])
    return str(error.message)


def _detail_text(detail: Any) -> str:
    """FastAPI's `detail` as one line: each pydantic error as "loc: msg [type=...]"."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        if isinstance(item, dict):
            loc = item.get("loc")
            where = ".".join(map(str, loc)) if isinstance(loc, (list, tuple)) else str(loc or "")
            parts.append(f"{where}: {item.get('msg', '')} [type={item.get('type', '')}]")
        else:
            parts.append(str(item))
    return "; ".join(parts)


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
