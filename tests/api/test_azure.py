"""Classic Azure OpenAI deployments through the shared client, recorded on the loopback stub: the
request path with ?api-version=, the api-key header, the base URL parsed from the portal's form
or built from options (one cache for both), and the errors for URLs that cannot work."""
import pytest

from api.azure import azure_target
from api.client import ApiClient, ApiRequest, EndpointError
from api.options import generation_params
from tests.api.http_stub import Reply, StubServer

SECRET = "azure-test-KEY-0c9e51f2"
KEY_ENV = "SPEECHSUM_TEST_AZURE_KEY"
VERSION = "2024-10-21"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def chat(content="ok"):
    return {"id": "chatcmpl-azure", "object": "chat.completion", "created": 0, "model": "gpt-4.1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}


def content(body):
    return body["choices"][0]["message"]["content"]


def request(model="gpt-4.1", **params):
    return ApiRequest("chat.completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], **params},
                      content)


def host(stub):
    return stub.base_url.removesuffix("/v1")  # http://127.0.0.1:PORT


def test_classic_deployment_url_gives_the_deployment_path_api_version_and_api_key_header(tmp_path):
    with StubServer(lambda r: Reply(body=chat())) as stub:
        client = ApiClient(f"{host(stub)}/openai/deployments/gpt41?api-version={VERSION}", api_key_env=KEY_ENV,
                           cache_dir=tmp_path / "cache")
        assert client.call(request(**generation_params(None, 300))) == "ok"
        sent = stub.requests[0]
    assert (sent.method, sent.path) == ("POST", f"/openai/deployments/gpt41/chat/completions?api-version={VERSION}")
    assert sent.headers["api-key"] == SECRET and "authorization" not in sent.headers
    assert sent.body == {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}],
                         "max_completion_tokens": 300}
    config = client.config()
    assert config["base_url"] == f"{host(stub)}/openai/deployments/gpt41"
    assert (config["azure_api_version"], config["azure_deployment"]) == (VERSION, "gpt41")
    assert SECRET not in repr(client) and SECRET not in str(config)


def test_options_and_portal_url_reach_the_same_path_and_share_the_cache(tmp_path):
    cache = tmp_path / "cache"
    with StubServer(lambda r: Reply(body=chat())) as stub:
        by_options = ApiClient(host(stub), api_key_env=KEY_ENV, cache_dir=cache, azure_api_version=VERSION,
                               azure_deployment="gpt41")
        by_options.call(request())
        # the "Target URI" the Azure portal shows, endpoint path included
        portal = ApiClient(f"{host(stub)}/openai/deployments/gpt41/chat/completions?api-version={VERSION}",
                           api_key_env=KEY_ENV, cache_dir=cache)
        assert portal.cache_key(request()) == by_options.cache_key(request())
        assert portal.call(request()) == "ok" and portal.usage.cache_hits == 1
        newer = ApiClient(f"{host(stub)}/openai/deployments/gpt41?api-version=2025-01-01-preview",
                          api_key_env=KEY_ENV, cache_dir=cache)
        newer.call(request())  # another api-version is another request: not served from the cache
        other = ApiClient(f"{host(stub)}/openai?api-version={VERSION}", api_key_env=KEY_ENV, cache_dir=cache)
        other.call(request(model="gpt-4o mini"))  # no deployment: the model names it
        paths = [r.path for r in stub.requests]
    assert paths == [f"/openai/deployments/gpt41/chat/completions?api-version={VERSION}",
                     "/openai/deployments/gpt41/chat/completions?api-version=2025-01-01-preview",
                     f"/openai/deployments/gpt-4o%20mini/chat/completions?api-version={VERSION}"]


def test_plain_servers_keep_their_url_config_and_cache_key(tmp_path):
    """No api-version: the ordinary client, the Bearer header, and a config without Azure fields
    (so eval.run's judge identity of existing runs is unchanged)."""
    with StubServer(lambda r: Reply(body=chat())) as stub:
        client = ApiClient(stub.base_url, api_key_env=KEY_ENV)
        client.call(request())
        sent = stub.requests[0]
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {SECRET}"
    assert "api-key" not in sent.headers
    assert set(client.config()) == {"base_url", "api_key_env", "timeout_s", "max_concurrency", "retry", "cache_dir"}
    assert azure_target(stub.base_url) is None


@pytest.mark.parametrize("url, options, message", [
    ("https://r.openai.azure.com/openai/deployments/gpt41/?api-version=2024-10-21&key=s3cr3t", {},
     "base URL https://r.openai.azure.com/openai/deployments/gpt41: query parameter(s) key are not understood"),
    ("https://r.openai.azure.com/openai/deployments/gpt41?api-version=2024-10-21", {"deployment": "gpt4o"},
     "its deployment 'gpt41' differs from the deployment option 'gpt4o'; give it once"),
    ("https://r.openai.azure.com/openai/deployments/gpt41?api-version=2024-10-21", {"api_version": "2024-06-01"},
     "its api-version '2024-10-21' differs from the api-version option '2024-06-01'"),
    ("https://r.openai.azure.com/openai/deployments/gpt41", {},
     "the Azure deployment 'gpt41' needs an api-version; add ?api-version=V"),
    ("https://r.openai.azure.com/openai/v1", {"api_version": "2024-10-21"},
     "a base URL ending in /v1 (Azure's v1 endpoint, or OpenAI's) takes neither an api-version nor a deployment"),
    ("https://r.openai.azure.com/openai?api-version=", {}, "api-version is empty"),
])
def test_urls_that_cannot_work_are_refused_with_what_to_change(url, options, message):
    with pytest.raises(ValueError) as error:
        azure_target(url, **options)
    assert message in str(error.value) and "s3cr3t" not in str(error.value)


def test_the_resource_url_is_taken_with_or_without_a_trailing_openai():
    for url in ("https://r.openai.azure.com", "https://r.openai.azure.com/", "https://r.openai.azure.com/openai/"):
        target = azure_target(url, "2024-10-21", "gpt41")
        assert (target.endpoint, target.public_base) == (
            "https://r.openai.azure.com", "https://r.openai.azure.com/openai/deployments/gpt41")


def test_a_refused_temperature_comes_with_the_hint():
    refusal = Reply(400, body={"error": {
        "message": "Unsupported value: 'temperature' does not support 0.0 with this model. Only the default (1) "
                   "value is supported.", "type": "invalid_request_error", "param": "temperature",
        "code": "unsupported_value"}})
    with StubServer(lambda r: refusal) as stub:
        client = ApiClient(f"{host(stub)}/openai/deployments/o3?api-version={VERSION}", api_key_env=KEY_ENV)
        with pytest.raises(EndpointError) as error:
            client.call(request(model="o3", **generation_params(0.0, 512)))
        assert stub.count() == 1  # a 400 is not retried
    assert error.value.status_code == 400 and str(error.value).startswith(
        f"{host(stub)}/openai/deployments/o3/chat/completions answered HTTP 400: Unsupported value: 'temperature'")
    assert str(error.value).endswith("leave the temperature unset, `none` on the command line)")
