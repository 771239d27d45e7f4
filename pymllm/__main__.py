"""python -m pymllm show-config [--server.<field> ...] | show-env"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from typing import List, Optional

from pymllm.configs import ConfigError
from pymllm.configs.global_config import add_config_arguments, config_from_namespace


def environment_report() -> dict:
    import torch

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{pkg: version(pkg) for pkg in (
            "pymllm", "mllm-kernel", "torch", "transformers", "tokenizers", "safetensors",
            "flashinfer-python", "triton", "apache-tvm-ffi", "compressed-tensors", "gguf",
            "fastapi", "uvicorn", "pyzmq",
        )},
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report["devices"].append({
                "index": i, "name": props.name, "capability": f"sm_{props.major}{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "integrated": bool(getattr(props, "is_integrated", False)),
            })
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymllm")
    sub = parser.add_subparsers(dest="command", required=True)
    show_config = sub.add_parser("show-config", help="print the resolved configuration as JSON")
    add_config_arguments(show_config)
    sub.add_parser("show-env", help="print versions and devices")
    args = parser.parse_args(argv)
    if args.command == "show-env":
        print(json.dumps(environment_report(), indent=2))
        return 0
    try:
        config = config_from_namespace(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resolved = config.to_dict()
    resolved["server"]["tokenizer_path"] = config.server.effective_tokenizer_path
    print(json.dumps(resolved, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
