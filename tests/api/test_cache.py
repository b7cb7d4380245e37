"""The response cache on its own: a process SIGKILLed while writing entries leaves a cache whose
every entry loads and a rerun that asks only for what is missing; an unreadable entry is a miss."""
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from api.cache import ResponseCache
from api.client import ApiClient, ApiRequest
from tests.api.http_stub import Reply, StubServer

REPO = Path(__file__).resolve().parents[2]

KILLED_WRITER = textwrap.dedent("""
    import sys
    from api.client import ApiClient, ApiRequest
    url, cache_dir = sys.argv[1], sys.argv[2]
    client = ApiClient(url, api_key_env=None, cache_dir=cache_dir, max_concurrency=4)
    client.map([ApiRequest("completions", {"model": "tiny", "prompt": [i]}, lambda body: body["choices"][0]["text"])
                for i in range(100000)])
""")


def test_process_killed_mid_run_leaves_a_cache_that_loads(tmp_path):
    """SIGKILL a process that is writing cache entries as fast as a stub answers (each entry about
    100 kB), then load the cache, and rerun: only the missing entries are requested again."""
    def answer(request):
        return Reply(body={"choices": [{"index": 0, "text": f"{request.body['prompt'][0]}:" + "x" * 100_000}]})

    cache_dir = tmp_path / "cache"
    with StubServer(answer) as stub:
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, stub.base_url, str(cache_dir)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while len(list(cache_dir.glob("??/*.json"))) < 25:
                assert writer.poll() is None, writer.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the writer produced no cache entries"
                time.sleep(0.01)
            writer.kill()
        finally:
            writer.kill()
            writer.wait(timeout=10)
        cache = ResponseCache(cache_dir)
        keys = cache.keys()
        assert len(keys) >= 25
        assert all(cache.get(key)[0] for key in keys)  # every entry under its final name is complete
        client = ApiClient(stub.base_url, api_key_env=None, cache_dir=cache_dir)
        before = stub.count()
        requests = [ApiRequest("completions", {"model": "tiny", "prompt": [i]}, lambda body: body["choices"][0]["text"])
                    for i in range(60)]
        cached = sum(cache.get(client.cache_key(request))[0] for request in requests)
        assert cached >= 20  # the writer works through the requests in order
        values = client.map(requests)
        assert stub.count() - before == 60 - cached
    assert client.usage.cache_hits == cached
    assert [v.split(":")[0] for v in values] == [str(i) for i in range(60)]


def test_unreadable_entry_is_a_miss(tmp_path, caplog):
    cache = ResponseCache(tmp_path)
    key = "ab" + "0" * 62
    cache.put(key, {"v": 1})
    assert cache.get(key) == (True, {"v": 1})
    cache.path(key).write_text('{"format": 1, "key": "ab00', encoding="utf-8")  # a torn copy
    (cache.path(key).parent / f".{key}.1234.tmp").write_text("{")  # an interrupted write
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) == (False, None)
    assert "unreadable" in caplog.text and cache.keys() == [key]
