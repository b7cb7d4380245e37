"""Classic Azure OpenAI deployments: which one a base URL and the options name, or none.

Azure's classic endpoints put the deployment in the path and the api-version in the query, which
the plain openai client cannot address, so the client switches to `openai.AzureOpenAI` when
`azure_target` finds one; every other server (Azure's v1 endpoint included) is a plain base URL.
Accepted forms and errors: docs/api-client.md, "Azure OpenAI".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from .keys import public_url


@dataclass(frozen=True)
class AzureTarget:
    """A classic Azure OpenAI deployment (docs/api-client.md, "Azure OpenAI")."""

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
