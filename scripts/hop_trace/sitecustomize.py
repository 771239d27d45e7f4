"""Per-hop timestamps of requests through the server's processes (a diagnosis tool).

Put this directory first on PYTHONPATH and set PYMLLM_HOP_TRACE to a directory: every Python
process that starts then (the HTTP frontend, the tokenizer, scheduler and detokenizer workers,
and the bench_serving client when run as ``python -c "import pymllm.bench_serving ..."``) patches
a few pymllm functions as they are imported and appends wall-clock events to
``$PYMLLM_HOP_TRACE/<pid>.log``: every ZMQ message sent or received, each scheduled batch, each
ModelRunner phase (staging, forward launch, sampling, which waits for the GPU), the /generate
handler, and each client request's start and time to first token. ``analyze.py`` turns the logs
into a per-request timeline. scripts/gpu_prefix_cache_bench.sh documents a traced run; the
findings are in docs/perf/prefix_cache_hops_h200.txt. Without PYMLLM_HOP_TRACE nothing is patched.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

_DIR = os.environ.get("PYMLLM_HOP_TRACE")
_LOG = None


def rec(tag: str, detail: str = "") -> None:
    global _LOG
    if _LOG is None:
        os.makedirs(_DIR, exist_ok=True)
        _LOG = open(os.path.join(_DIR, f"{os.getpid()}.log"), "a", buffering=1)
    _LOG.write(f"{time.time():.6f} {os.getpid()} {tag} {detail}\n")


def _rids(obj) -> str:
    rid = getattr(obj, "rid", None)
    if rid is not None:
        return str(rid)[:8]
    for name, attr in (("rids", None), ("outputs", "rid")):
        items = getattr(obj, name, None)
        if items:
            return ",".join(str(getattr(i, attr) if attr else i)[:8] for i in items[:4])
    return ""


def _patch_ipc(m) -> None:
    cls = m.MessageSocket
    send0, recv0 = cls.send, cls.recv

    def send(self, obj):
        rec("send", f"{type(obj).__name__} {_rids(obj)}")
        return send0(self, obj)

    def recv(self, block=True):
        obj = recv0(self, block)
        if obj is not None:
            rec("recv", f"{type(obj).__name__} {_rids(obj)}")
        return obj

    cls.send, cls.recv = send, recv


def _patch_runner(m) -> None:
    cls = m.ModelRunner
    for name in ("build_forward_batch", "forward", "sample"):
        orig = getattr(cls, name)

        def timed(self, *args, _orig=orig, _name=name, **kwargs):
            t0 = time.time()
            out = _orig(self, *args, **kwargs)
            batch = args[0]
            mode = getattr(batch, "mode", None) or getattr(batch, "forward_mode", None)
            rec(_name, f"{mode} dt_ms={(time.time() - t0) * 1e3:.3f} t0={t0:.6f}")
            return out

        setattr(cls, name, timed)


def _patch_scheduler(m) -> None:
    cls = m.Scheduler
    orig = cls._next_batch

    def _next_batch(self):
        t0 = time.time()
        batch = orig(self)
        if batch is not None:
            rec("next_batch", f"{batch.mode} reqs={len(batch.reqs)} new={sum(batch.extend_lens)} "
                              f"cached={sum(batch.prefix_lens)} dt_ms={(time.time() - t0) * 1e3:.3f}")
        return batch

    cls._next_batch = _next_batch


def _patch_native(m) -> None:
    orig = m.generate

    async def generate(state, body, request):
        rec("handler_in")
        response = await orig(state, body, request)
        rec("handler_out")
        return response

    m.generate = generate


def _patch_bench(m) -> None:
    orig = m.send_request

    async def send_request(client, args, model, prompt):
        t0 = time.time()
        result = await orig(client, args, model, prompt)
        rec("client", f"start={t0:.6f} ttft_ms={result.ttft * 1e3:.3f} cached={result.cached_tokens}")
        return result

    m.send_request = send_request


PATCHES = {
    "pymllm.orchestrator.ipc": _patch_ipc,
    "pymllm.executor.model_runner": _patch_runner,
    "pymllm.orchestrator.scheduler": _patch_scheduler,
    "pymllm.server.serving_native": _patch_native,
    "pymllm.bench_serving": _patch_bench,
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Lets the real finder locate a patched module, then patches it right after it executes
    (before anything that imported it can bind its names)."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _DIR:
    sys.meta_path.insert(0, _PatchOnImport())
