"""Online serving benchmark: stream requests at a server, measure TTFT, ITL, latency, throughput.

    python -m pymllm.bench_serving --base-url http://127.0.0.1:30000 --num-prompts 100 \\
        --dataset random --input-len 512 --output-len 128 --request-rate 8 --seed 0 \\
        --backend completions --result-filename bench.jsonl

Lengths are exact for the completions backend: prompts are token-id lists, and every request
forces ``ignore_eos`` with ``max_tokens``. The chat backend sends text (``input-len`` words),
so its prompt length is approximate; token counts come from the server's usage either way.

``--image WxH`` (chat backend, image models) puts ``--images-per-request`` random RGB images of
that size (seeded by --seed) into each user message as ``data:image/png;base64,`` image_url
parts, before the text; the fixed dataset repeats the same images.

``--score`` (completions backend) asks for the prompt's scores as lm-eval's loglikelihood requests
do (``echo`` with ``logprobs: 1``; ``--output-len 0`` generates nothing): with
``--shared-prefix-len`` it measures scoring several continuations of one context. Its TTFT is the
time to the scores (the echo chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import aiohttp
import httpx
import numpy as np

from pymllm.multimodal.synthetic import image_size_arg, png_data_url, random_images

# Text (chat), token ids (completions, generate), or chat content parts (chat with images).
Prompt = Union[str, List[int], List[Dict[str, Any]]]

_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case "
    "point government company number group problem fact"
).split()
# Random prompt ids skip the lowest ids, where vocabularies keep control and special tokens.
_LOWEST_RANDOM_ID = 16


class _AiohttpStream:
    """A streamed aiohttp response with the httpx names send_request reads."""

    def __init__(self, resp: aiohttp.ClientResponse):
        self._resp = resp
        self.status_code = resp.status

    async def aread(self) -> bytes:
        return await self._resp.read()

    async def aiter_lines(self):
        async for line in self._resp.content:
            yield line.decode("utf-8").rstrip("\r\n")


class _AiohttpJson:
    def __init__(self, status: int, payload: Any):
        self.status_code, self._payload = status, payload

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise aiohttp.ClientResponseError(None, (), status=self.status_code)  # type: ignore[arg-type]

    def json(self) -> Any:
        return self._payload


class AiohttpClient:
    """The part of httpx.AsyncClient's interface the benchmark uses (``get``, ``stream``), on
    aiohttp. The client library's own time lands in every measured TTFT: against the same
    server on loopback, a streamed request's first event took raw socket + ~0.8 ms through
    aiohttp and + ~2.4 ms through httpx. (Tests drive run_benchmark with an in-process httpx
    client; this one is for measuring real servers.)"""

    def __init__(self, base_url: str, headers: Dict[str, str], timeout: float):
        self._session = aiohttp.ClientSession(
            base_url=base_url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def __aenter__(self) -> "AiohttpClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def get(self, path: str) -> _AiohttpJson:
        async with self._session.get(path) as resp:
            payload = await resp.json() if resp.status < 400 else None
            return _AiohttpJson(resp.status, payload)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, json: Any):
        async with self._session.request(method, path, json=json) as resp:
            yield _AiohttpStream(resp)


# Transport failures of either client: the request counts as failed, the benchmark goes on.
_TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError, asyncio.TimeoutError)


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    itl: List[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


def make_prompts(args: argparse.Namespace) -> List[Prompt]:
    """Prompts of --input-len unique tokens (words for chat), each after the same
    --shared-prefix-len tokens (a shared system prompt, as prefix caching sees it)."""
    rng = random.Random(args.seed)
    if args.backend == "chat":
        def text(n: int) -> str:
            return " ".join(rng.choice(_WORDS) for _ in range(n))

        prefix = text(args.shared_prefix_len) + " " if args.shared_prefix_len else ""
        fixed = text(args.input_len)
        texts = [prefix + (fixed if args.dataset == "fixed" else text(args.input_len)) for _ in range(args.num_prompts)]
        if args.image is None:
            return texts
        return _with_images(args, texts)

    def ids(n: int) -> List[int]:
        return [rng.randrange(_LOWEST_RANDOM_ID, args.vocab_size) for _ in range(n)]

    prefix_ids = ids(args.shared_prefix_len)
    fixed_ids = ids(args.input_len)
    return [
        prefix_ids + (list(fixed_ids) if args.dataset == "fixed" else ids(args.input_len))
        for _ in range(args.num_prompts)
    ]


def _with_images(args: argparse.Namespace, texts: List[str]) -> List[Prompt]:
    """Each text as chat content parts: its --images-per-request images, then the text."""
    image_rng = np.random.default_rng(args.seed)

    def image_parts() -> List[Dict[str, Any]]:
        images = random_images(image_rng, args.image, args.images_per_request)
        return [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images]

    fixed = image_parts()
    return [
        (fixed if args.dataset == "fixed" else image_parts()) + [{"type": "text", "text": text}] for text in texts
    ]


_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "generate": "/generate"}


def _request_body(args: argparse.Namespace, model: str, prompt: Prompt) -> Dict[str, Any]:
    if args.backend == "generate":
        params = {"max_new_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0}
        return {"input_ids": prompt, "sampling_params": params, "stream": True}
    body: Dict[str, Any] = {
        "model": model,
        "max_tokens": args.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.backend == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.score:
        body.update(echo=True, logprobs=1)
    return body


def _chunk_has_output(chunk: Dict[str, Any]) -> bool:
    """A chunk that carries new tokens: text for the OpenAI routes, token ids for /generate
    (whose chunks also arrive for tokens that do not complete a character yet)."""
    if "output_ids" in chunk:
        return bool(chunk["output_ids"])
    return bool(_chunk_text(chunk))


def _chunk_text(chunk: Dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "delta" in choice:
            delta = choice["delta"]
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text += choice.get("text") or ""
    return text


async def send_request(
    client, args: argparse.Namespace, model: str, prompt: Prompt
) -> RequestResult:
    path = _PATHS[args.backend]
    result = RequestResult()
    start = time.perf_counter()
    last: Optional[float] = None
    try:
        async with client.stream("POST", path, json=_request_body(args, model, prompt)) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "stream error")
                    return result
                now = time.perf_counter()
                if _chunk_has_output(chunk):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                usage = chunk.get("usage") or chunk.get("meta_info")
                if usage:
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.output_tokens = usage["completion_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = usage.get("cached_tokens", details.get("cached_tokens")) or 0
    except _TRANSPORT_ERRORS as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = last is not None
    if not result.ok:
        result.error = "no output"
    return result


async def _model_name(client, args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def _arrivals(rate: float, count: int, rng: random.Random):
    """Yield once per request, spaced as a Poisson process of ``rate`` per second."""
    for i in range(count):
        yield i
        if math.isfinite(rate) and i < count - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def run_benchmark(args: argparse.Namespace, client) -> Dict[str, Any]:
    """Run every request against ``client`` (whose base_url is the server) and summarise."""
    model = await _model_name(client, args)
    prompts = make_prompts(args)
    limit = asyncio.Semaphore(args.concurrency) if args.concurrency else None

    async def one(prompt: Prompt) -> RequestResult:
        if limit is None:
            return await send_request(client, args, model, prompt)
        async with limit:
            return await send_request(client, args, model, prompt)

    start = time.perf_counter()
    tasks = []
    async for i in _arrivals(args.request_rate, len(prompts), random.Random(args.seed + 1)):
        tasks.append(asyncio.create_task(one(prompts[i])))
    results = await asyncio.gather(*tasks)
    return summarise(args, model, results, time.perf_counter() - start)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats_ms(name: str, values: Sequence[float]) -> Dict[str, float]:
    ms = [v * 1000.0 for v in values]
    return {
        f"mean_{name}_ms": sum(ms) / len(ms) if ms else 0.0,
        f"median_{name}_ms": _percentile(ms, 50),
        f"p99_{name}_ms": _percentile(ms, 99),
        # The longest gap shows a stall (a garbage collection, a recompile) that p99 can hide.
        f"max_{name}_ms": max(ms) if ms else 0.0,
    }


def summarise(
    args: argparse.Namespace, model: str, results: List[RequestResult], duration: float
) -> Dict[str, Any]:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    row: Dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": args.backend,
        "base_url": args.base_url,
        "model": model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "shared_prefix_len": args.shared_prefix_len,
        "output_len": args.output_len,
        "score": args.score,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "concurrency": args.concurrency,
        "seed": args.seed,
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "total_cached_tokens": sum(r.cached_tokens for r in done),
        "request_throughput": len(done) / duration if duration else 0.0,
        "input_throughput": input_tokens / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
    }
    if args.image is not None:
        row["image_size"] = "{}x{}".format(*args.image)
        row["images_per_request"] = args.images_per_request
    row.update(_stats_ms("ttft", [r.ttft for r in done]))
    row.update(_stats_ms("itl", [gap for r in done for gap in r.itl]))
    row.update(_stats_ms("tpot", tpot))
    row.update(_stats_ms("e2e_latency", [r.latency for r in done]))
    errors = [r.error for r in results if not r.ok]
    if errors:
        row["first_error"] = errors[0]
    return row


def format_table(row: Dict[str, Any]) -> str:
    lines = ["=" * 22 + " Serving Benchmark Result " + "=" * 22]

    def add(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<48}{text:>22}")

    add("Backend:", row["backend"])
    add("Model:", row["model"])
    add("Successful requests:", row["completed"])
    add("Failed requests:", row["failed"])
    add("Benchmark duration (s):", row["duration_s"])
    add("Total input tokens:", row["total_input_tokens"])
    add("Total generated tokens:", row["total_output_tokens"])
    add("Request throughput (req/s):", row["request_throughput"])
    add("Input token throughput (tok/s):", row["input_throughput"])
    add("Output token throughput (tok/s):", row["output_throughput"])
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                       ("itl", "Inter-token Latency"), ("e2e_latency", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{title:^40}{'-' * 15}")
        for stat in ("mean", "median", "p99", "max"):
            add(f"{stat.capitalize()} {key.upper().replace('_', ' ')} (ms):", row[f"{stat}_{key}_ms"])
    if "first_error" in row:
        lines.append(f"First error: {row['first_error']}")
    lines.append("=" * 70)
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pymllm.bench_serving", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=tuple(_PATHS), default="completions",
                   help="generate: the native /generate route, which streams token ids (exact TTFT).")
    p.add_argument("--model", default=None, help="Model name to send; default: the server's first model.")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=("random", "fixed"), default="random",
                   help="random: a new random prompt per request; fixed: one prompt for all.")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="Tokens (words for chat) every prompt starts with, before its --input-len own ones.")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="Random prompt ids are drawn below this (completions backend).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer directory; sets --vocab-size to its size.")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Poisson arrival rate in requests/s; inf sends all at once.")
    load.add_argument("--concurrency", type=int, default=None, help="Requests in flight at most.")
    p.add_argument("--image", type=image_size_arg, default=None, metavar="WxH",
                   help="Random images of this size in every request (chat backend, image models).")
    p.add_argument("--images-per-request", type=int, default=1, help="Images per request with --image.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--score", action="store_true",
                   help="Score each prompt (echo + logprobs, completions backend); --output-len may be 0.")
    p.add_argument("--result-filename", default=None, help="Append one JSON line of results here.")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "vocab_size"):
        least = 0 if name == "output_len" and args.score else 1
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}")
    if args.score and args.backend != "completions":
        p.error("--score needs --backend completions (echo and logprobs are the legacy API's)")
    if args.images_per_request < 1:
        p.error("--images-per-request must be >= 1")
    if args.image is not None and args.backend != "chat":
        p.error("--image needs --backend chat (images travel as chat image_url parts)")
    if args.shared_prefix_len < 0:
        p.error("--shared-prefix-len must be >= 0")
    if args.request_rate <= 0 or (args.concurrency is not None and args.concurrency < 1):
        p.error("--request-rate and --concurrency must be positive")
    if args.tokenizer:
        from transformers import AutoTokenizer

        args.vocab_size = len(AutoTokenizer.from_pretrained(args.tokenizer))
    if args.vocab_size <= _LOWEST_RANDOM_ID:
        p.error(f"--vocab-size must be > {_LOWEST_RANDOM_ID}")
    return args


async def _main(args: argparse.Namespace) -> Dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with AiohttpClient(args.base_url, headers, args.request_timeout) as client:
        return await run_benchmark(args, client)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    row = asyncio.run(_main(args))
    print(format_table(row))
    if args.result_filename:
        with open(args.result_filename, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0 if row["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
