"""eval.run's caches (eval/run_cache.py): a JSON-lines log drops a torn last line and skips
garbage, and appends read back. Resuming end to end: tests/eval/test_run.py."""
import logging

from eval.run_cache import JsonlLog


def test_jsonl_log_drops_a_torn_line_and_skips_garbage(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": "a", "key": "k1", "v": 1}\nnot json\n{"id": "b", "key": "k2", "v": 2}\n{"id": "c", "ke')
    with caplog.at_level(logging.WARNING):
        log = JsonlLog(path)
    assert [r["id"] for r in log.records] == ["a", "b"]
    assert "dropped a torn last line" in caplog.text and "log.jsonl:2: unreadable line skipped" in caplog.text
    log.append([{"id": "c", "key": "k3", "v": 3}])
    assert [r["id"] for r in JsonlLog(path).records] == ["a", "b", "c"]
    assert JsonlLog(path).index()[("c", "k3")]["v"] == 3
