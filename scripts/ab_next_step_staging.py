"""bench_one_batch with the next-step staging on (as shipped) or off, for A/B runs:

    python scripts/ab_next_step_staging.py on|off <bench_one_batch arguments>

off patches CudaGraphRunner.predict_next to a no-op, so every decode step is packed in full
before its launch (the path before 362efb7). Used for run S10 in docs/perf.
"""
import sys

from pymllm.executor import cuda_graph_runner

if __name__ == "__main__":
    if sys.argv[1] not in ("on", "off"):
        sys.exit("usage: ab_next_step_staging.py on|off <bench_one_batch arguments>")
    if sys.argv[1] == "off":
        cuda_graph_runner.CudaGraphRunner.predict_next = lambda self: None
    from pymllm.bench_one_batch import main

    sys.exit(main(sys.argv[2:]))
