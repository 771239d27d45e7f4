"""In-process drivers shared by the engine-level tests (no worker processes)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pymllm.configs import GlobalConfig
from pymllm.engine.io_struct import TokenizedGenerateReq
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.scheduler import Scheduler
from pymllm.orchestrator.scheduler_process import build_scheduler
from pymllm.sampling_params import SamplingParams
from pymllm.testing.triton_interpreter import check_in_interpreter


def make_scheduler(model_dir, **server) -> Scheduler:
    config = GlobalConfig()
    config.server.model_path = str(model_dir)
    config.server.device = "cpu"
    config.server.dtype = server.pop("dtype", "float32")
    for key, value in server.items():
        setattr(config.server, key, value)
    config.validate()
    return build_scheduler(config, check_invariants=True)


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw).with_defaults({})


def run_requests(
    scheduler: Scheduler,
    prompts: Sequence[List[int]],
    params: Sequence[SamplingParams],
    arrival_steps: Optional[Sequence[int]] = None,
    max_steps: int = 10_000,
    aborts: Optional[Dict[int, int]] = None,
) -> Dict[str, Req]:
    """Submit prompts (each at its arrival step; request i is aborted at step aborts[i] once
    submitted) and step until everything finished; then check that nothing leaked."""
    arrival_steps = arrival_steps or [0] * len(prompts)
    aborts = dict(aborts or {})
    pending = sorted(range(len(prompts)), key=lambda i: arrival_steps[i])
    reqs: Dict[str, Req] = {}
    step = 0
    while pending or scheduler.has_work():
        while pending and arrival_steps[pending[0]] <= step:
            i = pending.pop(0)
            reqs[str(i)] = scheduler.add_request(TokenizedGenerateReq(str(i), list(prompts[i]), params[i]))
        for i in [i for i, at in aborts.items() if at <= step and str(i) in reqs]:
            scheduler.abort(str(i))
            del aborts[i]
        scheduler.step()
        step += 1
        assert step < max_steps, "scheduler did not finish"
    # Finished sequences may stay in the prefix cache, unlocked; nothing else may hold a slot.
    cache = scheduler.prefix_cache
    assert scheduler.allocator.used_size() == cache.total_cached() == cache.evictable_size(), "KV slots leaked"
    assert scheduler.req_pool.available_size() == scheduler.req_pool.size, "request slots leaked"
    return reqs


def assert_passes_under_triton_interpreter(module: str, function: str, printed: Optional[str] = None) -> None:
    """``module.function()`` in a child Python under Triton's interpreter exits 0 and, when given,
    prints ``printed`` (the checks' own proof that they ran to the end); skipped without Triton or
    where the interpreter cannot run our kernels (check_in_interpreter)."""
    result = check_in_interpreter(["-c", f"from {module} import {function}; {function}()"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    if printed is not None:
        assert printed in result.stdout


def write_random_images(out_dir: Path, sizes: Sequence[tuple], seed: int = 0) -> List[str]:
    """One random RGB PNG per (height, width) in out_dir; their paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = Path(out_dir) / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def request_tokenizer_for(model_dir):
    """The tokenizer process's RequestTokenizer for a model directory (image models get their
    image pipeline), built in-process."""
    import torch
    from transformers import AutoTokenizer

    from pymllm.configs.model_config import load_model_config
    from pymllm.orchestrator.tokenizer_process import build_request_tokenizer

    config = GlobalConfig()
    config.server.model_path = str(model_dir)
    model_config = load_model_config(config.server, torch.device("cpu"))
    return build_request_tokenizer(config, model_config, AutoTokenizer.from_pretrained(model_dir))


def record_decode_rope_fusions(monkeypatch) -> List[bool]:
    """Patch FlashInferAttnBackend.forward_decode_rope to record, per call, whether the backend
    fused the q/k norms and rope into its attention (the list it appends to is returned)."""
    from pymllm.layers.attention import flashinfer_backend as fib

    calls: List[bool] = []
    fused = fib.FlashInferAttnBackend.forward_decode_rope

    def recording(self, *args, **kwargs):
        out = fused(self, *args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fib.FlashInferAttnBackend, "forward_decode_rope", recording)
    return calls


def cache_kwargs(model, out) -> Dict[str, Any]:
    """The keyword argument that hands a transformers reference model's KV cache (in ``out``) to its
    next forward: ``cache`` in the releases that renamed it (5.2x, where ``past_key_values`` warns
    that 5.40 removes it), ``past_key_values`` before them (the GPU machine's 5.17)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}
