"""pymllm: an LLM inference server for NVIDIA GPUs (Jetson Orin to Hopper) with a CPU path."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import pymllm` stays light for the worker processes and the CLI.
    if name == "Engine":
        from pymllm.engine.launch import Engine

        return Engine
    raise AttributeError(name)
