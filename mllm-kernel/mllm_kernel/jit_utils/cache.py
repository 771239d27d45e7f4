"""On-disk cache of compiled kernels.

Layout: ``<root>/<kernel>/<target tag>-<key>/`` holding ``<kernel>.so``, the
generated wrapper, the build files and ``meta.json``. An entry directory only
ever appears complete: it is built under a temporary name in the same parent
and renamed into place, so concurrent processes never see a half-written
library, the first finisher wins, and a failed build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import tvm_ffi

from mllm_kernel.jit_utils import compiler
from mllm_kernel.jit_utils.registry import KernelSpec
from mllm_kernel.jit_utils.target import Target

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "MLLM_KERNEL_CACHE_DIR"

_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/mllm_kernel").expanduser()


def source_files(spec: KernelSpec, device: str) -> list[Path]:
    """The kernel's sources plus every header of ours they include, transitively.

    Quoted includes are resolved like the compiler does (including file's
    directory, then the include path); angle-bracket includes are system or
    TVM-FFI headers, covered by the tvm_ffi version in the key.
    """
    search_dirs = compiler.include_dirs(device)
    found: dict[Path, None] = {}
    pending = list(spec.sources_for(device))
    while pending:
        path = pending.pop().resolve()
        if path in found:
            continue
        found[path] = None
        for name in _QUOTED_INCLUDE.findall(path.read_text()):
            for directory in (path.parent, *search_dirs):
                candidate = directory / name
                if candidate.is_file():
                    pending.append(candidate)
                    break
    return sorted(found)


def cache_key(spec: KernelSpec, target: Target, template_args: Sequence[str]) -> str:
    """Hash of everything that determines the compiled library."""
    # Contents only, not paths: the same sources installed elsewhere share entries.
    sources = sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in source_files(spec, target.device))
    description = {
        "name": spec.name,
        "entry": spec.entry,
        "template_args": list(template_args),
        "device": target.device,
        "target": target.tag,
        "sources": sources,
        "flags": {key: list(value) for key, value in compiler.compile_flags(target).items()},
        "tvm_ffi": tvm_ffi.__version__,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def entry_dir(spec: KernelSpec, target: Target, template_args: Sequence[str]) -> Path:
    return cache_root() / spec.name / f"{target.tag}-{cache_key(spec, target, template_args)}"


def describe(spec: KernelSpec, template_args: Sequence[str]) -> str:
    """Human-readable instance name, e.g. ``store_cache<float, int64_t>``."""
    return f"{spec.name}<{', '.join(template_args)}>" if template_args else spec.name


def load_or_build(spec: KernelSpec, target: Target, template_args: Sequence[str]) -> Path:
    """Path of the compiled library, compiling it first if it is not cached."""
    entry = entry_dir(spec, target, template_args)
    library = entry / f"{spec.name}.so"
    if library.is_file():
        logger.info("loaded cached kernel %s (%s)", describe(spec, template_args), target.tag)
        return library

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        logger.info("compiling kernel %s (%s) ...", describe(spec, template_args), target.tag)
        start = time.perf_counter()
        try:
            compiler.build(spec, target, template_args, staging)
        except RuntimeError as error:
            instance = describe(spec, template_args)
            raise RuntimeError(f"failed to compile kernel {instance} ({target.tag}):\n{error}") from None
        meta = {"name": spec.name, "template_args": list(template_args), "target": target.tag}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(staging, entry)
        except OSError:
            # Another process published the same entry first; its copy is identical.
            if not library.is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
        logger.info(
            "compiled kernel %s (%s) in %.1f s", describe(spec, template_args), target.tag, time.perf_counter() - start
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return library


def cached_variants(spec: KernelSpec, target: Target) -> list[tuple[str, ...]]:
    """Template arguments of the up-to-date cached builds of ``spec`` for ``target``.

    Entries built from older sources or flags have a different key and are skipped.
    """
    variants = []
    for meta_path in sorted((cache_root() / spec.name).glob(f"{target.tag}-*/meta.json")):
        template_args = tuple(json.loads(meta_path.read_text())["template_args"])
        if meta_path.parent == entry_dir(spec, target, template_args):
            variants.append(template_args)
    return variants
