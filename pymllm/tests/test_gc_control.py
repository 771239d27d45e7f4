"""The serving processes keep the garbage collector's pauses short (pymllm.orchestrator.gc_control)."""

from __future__ import annotations

import gc
import logging
import re

import httpx
import pytest

from pymllm.configs import ConfigError, parse_config
from pymllm.mem_cache.prompt_score_cache import PromptScoreCache, prefix_keys
from pymllm.orchestrator.gc_control import GcPauseWarning, start_serving, watch_gc_pauses
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.server_process import ServerProcess


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_collection_longer_than_the_threshold_is_logged(caplog):
    clock = _Clock()
    hook = GcPauseWarning("scheduler", threshold_ms=50, clock=clock)
    with caplog.at_level(logging.WARNING, logger="pymllm.orchestrator.gc_control"):
        hook("start", {"generation": 2})
        clock.now += 0.049
        hook("stop", {"generation": 2, "collected": 3})
        assert caplog.records == []
        hook("start", {"generation": 2})
        clock.now += 0.120
        hook("stop", {"generation": 2, "collected": 7})
    [record] = caplog.records
    assert re.search(r"scheduler: garbage collection of generation 2 paused the process for 120 ms", record.getMessage())
    assert hook.longest_s == pytest.approx(0.120)
    hook("stop", {"generation": 0, "collected": 0})  # a stop without its start (installed mid-collection)
    assert len(caplog.records) == 1


def test_the_warning_hooks_into_real_collections_and_zero_turns_it_off():
    assert watch_gc_pauses("http", 0) is None
    hook = watch_gc_pauses("http", 1e-9)
    try:
        assert hook in gc.callbacks
        gc.collect()
        assert hook.longest_s > 0
    finally:
        hook.remove()
    assert hook not in gc.callbacks


def test_start_serving_freezes_the_heap_then_watches_without_warning_for_its_own_collection(caplog):
    try:
        with caplog.at_level(logging.INFO, logger="pymllm.orchestrator.gc_control"):
            start_serving("tokenizer", 1e-9)
        [hook] = [h for h in gc.callbacks if isinstance(h, GcPauseWarning)]
        frozen = int(re.search(r"tokenizer: (\d+) start-up objects moved out", caplog.text).group(1))
        assert frozen > 1000 and gc.get_freeze_count() > 1000
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        # Frozen objects are no longer walked: a full collection now sees only what came after.
        gc.collect()
        assert len(gc.get_objects()) < frozen
        assert hook.longest_s > 0 and "tokenizer: garbage collection of generation 2" in caplog.text
    finally:
        gc.unfreeze()
        for h in [h for h in gc.callbacks if isinstance(h, GcPauseWarning)]:
            h.remove()


def test_start_serving_with_the_warning_off_installs_no_hook(caplog):
    try:
        with caplog.at_level(logging.INFO, logger="pymllm.orchestrator.gc_control"):
            start_serving("detokenizer", 0)
        assert not [h for h in gc.callbacks if isinstance(h, GcPauseWarning)]
        assert "detokenizer: " in caplog.text and "will be logged" not in caplog.text
    finally:
        gc.unfreeze()


def test_score_cache_entries_are_not_tracked_by_the_collector():
    cache = PromptScoreCache()
    tokens = list(range(10, 300))
    keys = prefix_keys(tokens)
    cache.insert(keys, 0, [(tokens[i + 1], -1.0, [(tokens[i + 1], -1.0), (7, -2.0)]) for i in range(len(tokens) - 1)], 2)
    for _ in range(3):  # each collection untracks the tuples whose items are all untracked
        gc.collect()
    held = list(cache._entries.items())
    assert held and not any(gc.is_tracked(o) for k, v in held for o in (k, v, v[1], v[1][2], *v[1][2]))
    # Lookups still hand out the TokenLogprob shape, alternatives as a list.
    found = cache.lookup(keys, 1)
    assert found[0] == (tokens[1], -1.0, [(tokens[1], -1.0)])


def test_gc_warn_ms_is_validated():
    assert parse_config(["--server.model_path", "/m"]).server.gc_warn_ms == 50.0
    assert parse_config(["--server.model_path", "/m", "--server.gc_warn_ms", "0"]).server.gc_warn_ms == 0.0
    with pytest.raises(ConfigError, match=r"--server\.gc_warn_ms"):
        parse_config(["--server.model_path", "/m", "--server.gc_warn_ms", "-1"])


def test_every_server_process_freezes_its_start_up_heap_and_reports_long_pauses():
    # A threshold of a microsecond makes every collection "long", so each process's warning shows.
    srv = ServerProcess(["--server.model_path", str(tiny_model_dir("qwen3")), "--server.max_total_tokens", "512",
                         "--server.gc_warn_ms", "0.001"])
    try:
        # Chat requests: rendering the template allocates enough to start a collection in each process.
        for i in range(10):
            r = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hello " * (i + 1)}], "max_tokens": 8})
            assert r.status_code == 200
        log = srv.log_path.read_text()
    finally:
        srv.stop()
    for process in ("http", "tokenizer", "scheduler", "detokenizer"):
        assert re.search(rf"{process}: \d+ start-up objects moved out of the garbage collector's scans", log), process
        assert re.search(rf"{process}: \d+ start-up objects .*; collections pausing it over 0.001 ms will be logged", log), process
    # The HTTP process allocates the most per request, so it is the one sure to have collected.
    assert "http: garbage collection of generation" in log
