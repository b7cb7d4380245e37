"""The project's one OpenAI-compatible HTTP client, used by the KD teacher, the judges and data.synth.

A package of its own, below rollout, data, eval and train, so each of them can import it without
reaching into another layer. It imports only the standard library, `openai` and the atomic-write
helper of model/safeio.py. Modules: `client` (ApiClient, ApiRequest, errors), `retry` (backoff and
Retry-After), `cache` (the crash-safe response cache), `azure` (classic Azure deployments), `keys`
(the API key's variable, redaction), `options` (generation parameters, command-line options).
The protocol in full: docs/api-client.md.
"""
