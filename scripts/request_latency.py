"""Latency of single requests to a running server, sent one at a time (time to a whole reply).

    python scripts/request_latency.py PORT PROMPT_TOKENS REPS

Four kinds of request, each with a fresh random prompt of PROMPT_TOKENS token ids (10..1399, so
that the tiny test tokenizer's vocabulary serves too): ``plain`` (/v1/completions, max_tokens 1),
``score_echo`` (echo + logprobs 1, max_tokens 0: prompt scoring as lm-eval sends it),
``score_echo_lp0`` (the same with logprobs 0) and ``generate_prompt_logprobs`` (/generate with
prompt_logprobs). Two warm-up rounds, then REPS rounds of the four kinds in turn; prints each
kind's median and minimum in ms and the size of its last reply.
"""

import json
import random
import statistics
import sys
import time
import urllib.request


def main() -> None:
    port, n, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    seed = [int(time.time())]

    def post(path: str, body: dict):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        reply = urllib.request.urlopen(req).read()
        return (time.perf_counter() - start) * 1e3, len(reply)

    def ids():
        seed[0] += 1
        rnd = random.Random(seed[0])
        return [rnd.randrange(10, 1400) for _ in range(n)]

    kinds = {
        "plain": lambda: ("/v1/completions", {"prompt": ids(), "max_tokens": 1}),
        "score_echo": lambda: ("/v1/completions", {"prompt": ids(), "max_tokens": 0, "echo": True, "logprobs": 1}),
        "score_echo_lp0": lambda: ("/v1/completions", {"prompt": ids(), "max_tokens": 0, "echo": True, "logprobs": 0}),
        "generate_prompt_logprobs": lambda: (
            "/generate", {"input_ids": ids(), "sampling_params": {"max_new_tokens": 1, "prompt_logprobs": True}}),
    }
    results = {k: [] for k in kinds}
    for _ in range(2):
        for make in kinds.values():
            post(*make())
    for _ in range(reps):
        for kind, make in kinds.items():
            results[kind].append(post(*make()))
    for kind, got in results.items():
        ms = [t for t, _ in got]
        print(f"{kind:26s} n={n} median {statistics.median(ms):7.1f} ms  min {min(ms):7.1f}  bytes {got[-1][1]}")


if __name__ == "__main__":
    main()
