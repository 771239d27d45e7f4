"""Engine: starts the tokenizer, scheduler and detokenizer processes and serves requests.

Usable offline (``Engine(...).generate(...)``) and as the backend of the HTTP server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import zmq

from pymllm.configs.global_config import GlobalConfig
from pymllm.configs.model_config import load_model_config, resolve_model_path
from pymllm.configs.server_config import ServerConfig
from pymllm.engine.client import EngineClient, new_request_id
from pymllm.engine.io_struct import GenerateReqInput, RequestOutput
from pymllm.orchestrator.detokenizer_process import detokenizer_process_main
from pymllm.orchestrator.ipc import Endpoints, WorkerFailed, WorkerReady, pull
from pymllm.orchestrator.scheduler_process import scheduler_process_main
from pymllm.orchestrator.tokenizer_process import tokenizer_process_main

logger = logging.getLogger(__name__)

_WORKERS = ("tokenizer", "scheduler", "detokenizer")


class EngineStartupError(RuntimeError):
    pass


def _config_from(config: Optional[GlobalConfig], overrides: Dict[str, Any]) -> GlobalConfig:
    config = dataclasses.replace(config) if config is not None else GlobalConfig()
    if overrides:
        names = {f.name for f in dataclasses.fields(ServerConfig)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown server option(s): {', '.join(sorted(unknown))}")
        config.server = dataclasses.replace(config.server, **overrides)
    config.validate()
    return config


class Engine:
    """Offline entry point. ``Engine(model_path=...)`` takes ServerConfig fields as keywords."""

    def __init__(
        self,
        config: Optional[GlobalConfig] = None,
        on_worker_death: Optional[Callable[[str], None]] = None,
        startup_timeout: float = 900.0,
        **server_overrides: Any,
    ):
        self.config = _config_from(config, server_overrides)
        self._on_worker_death = on_worker_death
        self._procs: List[mp.Process] = []
        self._parent_conns = []
        self._closed = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        started = time.perf_counter()
        server = self.config.server
        # Resolve once here (the embedded model converts from GGUF on first use).
        server.model_path = resolve_model_path(server)
        model_config = load_model_config(server, torch.device("cpu"), server.model_path)
        self.model_config = model_config
        self.endpoints = Endpoints.create()
        inbox = pull(zmq.Context.instance(), self.endpoints.frontend_in)
        try:
            self._start_workers(inbox, model_config, startup_timeout)
        except BaseException:
            inbox.close()
            self.shutdown()
            raise
        from transformers import AutoTokenizer

        from pymllm.orchestrator.tokenizer_process import RequestTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer_path)
        max_in_flight = None
        if server.max_queued_requests is not None:
            max_in_flight = server.max_running_requests + server.max_queued_requests
        self.client = EngineClient(
            self.endpoints,
            inbox,
            model_name=server.served_model_name or os.path.basename(os.path.normpath(server.model_path)),
            context_length=model_config.context_length,
            tokenizer=tokenizer,
            max_in_flight=max_in_flight,
            # Token-id requests are checked here and skip the tokenizer process.
            request_tokenizer=RequestTokenizer(tokenizer, model_config.context_length, model_config.generation_defaults),
        )
        threading.Thread(target=self._watch_workers, daemon=True, name="worker-watch").start()
        logger.info("Engine ready in %.1f s", time.perf_counter() - started)

    # ---------------- processes ----------------
    def _start_workers(self, inbox, model_config, timeout: float) -> None:
        ctx = mp.get_context("spawn")
        targets = {
            "tokenizer": (tokenizer_process_main, (self.config, model_config, self.endpoints)),
            "scheduler": (scheduler_process_main, (self.config, self.endpoints)),
            "detokenizer": (detokenizer_process_main, (self.config, model_config, self.endpoints)),
        }
        t0 = time.perf_counter()
        for name in _WORKERS:
            fn, args = targets[name]
            child_conn, parent_conn = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=fn, args=(*args, child_conn), name=f"pymllm-{name}", daemon=True)
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._parent_conns.append(parent_conn)
        ready: Dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(ready) < len(_WORKERS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineStartupError(f"workers not ready after {timeout:.0f} s: missing {set(_WORKERS) - set(ready)}")
            if not inbox.socket.poll(int(min(remaining, 1.0) * 1000)):
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead:
                    raise EngineStartupError(f"worker process(es) exited during start-up: {dead}")
                continue
            msg = inbox.recv()
            if isinstance(msg, WorkerFailed):
                raise EngineStartupError(f"{msg.name} failed to start: {msg.error}")
            if isinstance(msg, WorkerReady):
                ready[msg.name] = msg.info
                logger.info("%s ready after %.1f s", msg.name, time.perf_counter() - t0)

    def _watch_workers(self) -> None:
        procs = list(self._procs)
        wait_for_sentinels([p.sentinel for p in procs])
        if self._closed:
            return
        dead = [f"{p.name} (exit code {p.exitcode})" for p in procs if not p.is_alive()]
        reason = f"worker process died: {', '.join(dead)}"
        logger.error("%s; the engine cannot serve any more", reason)
        self.client.mark_dead(reason)
        if self._on_worker_death is not None:
            self._on_worker_death(reason)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self._parent_conns:
            conn.close()  # workers watch this pipe and exit on EOF
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---------------- generation ----------------
    async def _generate_one(self, req: GenerateReqInput) -> Dict[str, Any]:
        text, ids, logprobs = [], [], []
        prompt_logprobs = None
        last: Optional[RequestOutput] = None
        async for out in self.client.generate(req):
            text.append(out.text)
            ids.extend(out.token_ids)
            if out.logprobs:
                logprobs.extend(out.logprobs)
            if out.prompt_logprobs is not None:
                prompt_logprobs = out.prompt_logprobs
            last = out
        reason = last.finish_reason
        if reason is not None and reason.status_code is not None:
            raise ValueError(reason.message)
        result = {
            "text": "".join(text),
            "output_ids": ids,
            "meta_info": {
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "cached_tokens": last.cached_tokens,
                "finish_reason": reason.to_dict() if reason else None,
            },
        }
        if req.sampling_params.get("logprobs"):
            result["logprobs"] = logprobs
        if req.sampling_params.get("prompt_logprobs"):
            result["prompt_logprobs"] = prompt_logprobs
        return result

    async def async_generate(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        sampling_params: Union[dict, Sequence[dict], None] = None,
        input_ids: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
        messages: Optional[List[dict]] = None,
    ) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        reqs, single = _build_requests(prompt, sampling_params, input_ids, messages)
        results = await asyncio.gather(*(self._generate_one(r) for r in reqs))
        return results[0] if single else list(results)

    def generate(self, prompt=None, sampling_params=None, input_ids=None, messages=None):
        """Blocking generate; a list in, a list out. Runs on the engine's own event loop."""
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(
            self.async_generate(prompt, sampling_params, input_ids, messages), loop
        )
        return future.result()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="engine-loop")
            self._loop_thread.start()
        return self._loop


def _build_requests(prompt, sampling_params, input_ids, messages):
    if sum(x is not None for x in (prompt, input_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt, input_ids or messages")
    if prompt is not None:
        single = isinstance(prompt, str)
        items = [{"text": p} for p in ([prompt] if single else prompt)]
    elif input_ids is not None:
        single = len(input_ids) == 0 or isinstance(input_ids[0], int)
        items = [{"input_ids": list(x)} for x in ([input_ids] if single else input_ids)]
    else:
        single = True
        items = [{"messages": messages}]
    if sampling_params is None or isinstance(sampling_params, dict):
        params = [dict(sampling_params or {})] * len(items)
    else:
        params = list(sampling_params)
        if len(params) != len(items):
            raise ValueError("sampling_params must be one dict or one per prompt")
    reqs = [GenerateReqInput(rid=new_request_id(), sampling_params=p, **item) for item, p in zip(items, params)]
    return reqs, single
