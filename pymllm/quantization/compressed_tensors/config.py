"""compressed-tensors: parse ``quantization_config`` from config.json and pick a scheme per layer.

A checkpoint written by the compressed-tensors library (llm-compressor) describes its
quantization as config groups, each with ``targets`` (class names such as "Linear", exact
module names, or ``re:`` patterns) and the quantization arguments of its weights and input
activations, plus an ``ignore`` list of modules left in float. Names are the checkpoint's
(``q_proj``, ``gate_proj``); our fused layers (``qkv_proj``, ``gate_up_proj``) are resolved
through the model's stacked-parameter mapping, and every shard of a fused layer must agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from pymllm.quantization.base import LinearMethodBase, QuantizationConfig
from pymllm.quantization.compressed_tensors.linear_method import CompressedTensorsLinearMethod
from pymllm.quantization.compressed_tensors.schemes import (
    CompressedTensorsScheme,
    W8A8Int8Scheme,
    WNA16Scheme,
)

# Our linear layers play the role of torch.nn.Linear for class-name targets.
_LINEAR_CLASS_NAMES = ("Linear", "LinearBase")
_SUPPORTED_STATUS = ("compressed", "frozen")
WNA16_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantArgs:
    """The fields of a compressed-tensors ``QuantizationArgs`` that decide the kernel."""

    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: Optional[int]
    dynamic: bool
    actorder: Optional[str]
    block_structure: Optional[Any]

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> "QuantArgs":
        if not isinstance(raw, Mapping):
            raise ValueError(f"compressed-tensors config: {where} must be an object, got {raw!r}")
        try:
            return cls(
                num_bits=int(raw.get("num_bits", 8)),
                type=str(raw.get("type", "int")),
                symmetric=bool(raw.get("symmetric", True)),
                strategy=str(raw.get("strategy") or "tensor"),
                group_size=None if raw.get("group_size") is None else int(raw["group_size"]),
                dynamic=raw.get("dynamic", False) is True or raw.get("dynamic") == "local",
                actorder=None if raw.get("actorder") in (None, False) else str(raw["actorder"]),
                block_structure=raw.get("block_structure"),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"compressed-tensors config: cannot parse {where}: {e}") from None


@dataclass(frozen=True)
class SchemeSpec:
    """One config group: what it targets and how its weights/activations are quantized."""

    name: str
    targets: Tuple[str, ...]
    weights: Optional[QuantArgs]
    input_activations: Optional[QuantArgs]
    has_output_activations: bool
    format: Optional[str]


def _match_name(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


class CompressedTensorsConfig(QuantizationConfig):
    """``get_linear_method(prefix)`` returns the scheme's LinearMethod, or None to keep float."""

    name = "compressed-tensors"

    def __init__(self, groups: Sequence[SchemeSpec], ignore: Sequence[str], default_format: Optional[str]):
        super().__init__()
        self.groups = list(groups)
        self.ignore = list(ignore)
        self.default_format = default_format

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CompressedTensorsConfig":
        """Parse the ``quantization_config`` block; rejects features that change every layer."""
        method = config.get("quant_method", cls.name)
        if method != cls.name:
            raise ValueError(f"compressed-tensors config: quant_method is {method!r}, expected {cls.name!r}")
        for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if config.get(key):
                raise ValueError(f"compressed-tensors config: {key} is not supported (got {config[key]!r})")
        status = config.get("quantization_status", "compressed")
        if status not in _SUPPORTED_STATUS:
            raise ValueError(
                f"compressed-tensors config: quantization_status {status!r} is not supported; "
                f"expected one of {', '.join(_SUPPORTED_STATUS)} (a saved, compressed checkpoint)"
            )
        raw_groups = config.get("config_groups") or {}
        if not isinstance(raw_groups, Mapping) or not raw_groups:
            raise ValueError("compressed-tensors config: config_groups is missing or empty")
        groups = []
        for name, raw in raw_groups.items():
            where = f"config_groups.{name}"
            targets = raw.get("targets") or []
            if isinstance(targets, str):
                targets = [targets]
            weights = raw.get("weights")
            inputs = raw.get("input_activations")
            groups.append(
                SchemeSpec(
                    name=str(name),
                    targets=tuple(str(t) for t in targets),
                    weights=None if weights is None else QuantArgs.parse(weights, f"{where}.weights"),
                    input_activations=None if inputs is None else QuantArgs.parse(inputs, f"{where}.input_activations"),
                    has_output_activations=raw.get("output_activations") is not None,
                    format=raw.get("format"),
                )
            )
        ignore = config.get("ignore") or []
        if isinstance(ignore, str):
            ignore = [ignore]
        return cls(groups, [str(i) for i in ignore], config.get("format"))

    # ---------------- per-layer decisions ----------------
    def is_ignored(self, name: str) -> bool:
        """Exact names, module-path prefixes ("model.visual" covers its children) and ``re:`` patterns."""
        for pattern in self.ignore:
            if _match_name(name, pattern) or (not pattern.startswith("re:") and name.startswith(pattern + ".")):
                return True
        return False

    def scheme_spec_for(self, name: str) -> Optional[SchemeSpec]:
        """The config group targeting checkpoint module ``name``; like compressed-tensors, an exact
        name beats a regex, which beats a class name."""
        ranked: List[Tuple[int, SchemeSpec]] = []
        for spec in self.groups:
            for target in spec.targets:
                if target.startswith("re:"):
                    rank = 1 if _match_name(name, target) else None
                elif target in _LINEAR_CLASS_NAMES:
                    rank = 2
                else:
                    rank = 0 if target == name else None
                if rank is not None:
                    ranked.append((rank, spec))
        if not ranked:
            return None
        return min(ranked, key=lambda item: item[0])[1]

    def get_linear_method(self, prefix: str) -> Optional[LinearMethodBase]:
        shards = self.checkpoint_names(prefix)
        ignored = [s for s in shards if self.is_ignored(s)]
        if len(ignored) == len(shards):
            return None
        if ignored:
            raise ValueError(
                f"{prefix}: compressed-tensors ignore covers {ignored} but not the other shards of this "
                "fused layer; a fused layer is kept in float only if all its shards are ignored"
            )
        specs = {s: self.scheme_spec_for(s) for s in shards}
        targeted = {s: spec for s, spec in specs.items() if spec is not None}
        if not targeted:
            return None
        if len(targeted) != len(shards) or len({spec.name for spec in targeted.values()}) > 1:
            summary = ", ".join(f"{s} -> {spec.name if spec else 'unquantized'}" for s, spec in specs.items())
            raise ValueError(f"{prefix}: the shards of this fused layer use different config groups ({summary})")
        spec = next(iter(targeted.values()))
        return CompressedTensorsLinearMethod(self.build_scheme(spec, prefix))

    def build_scheme(self, spec: SchemeSpec, layer: str) -> CompressedTensorsScheme:
        """The scheme implementing ``spec``, or a ValueError naming the layer and the field."""
        where = f"{layer} (config group {spec.name!r})"
        fmt = spec.format or self.default_format
        weights, inputs = spec.weights, spec.input_activations
        if weights is None:
            raise ValueError(f"{where}: weights is null; activation-only quantization is not supported")
        if spec.has_output_activations:
            raise ValueError(f"{where}: output_activations is not supported")
        if weights.type != "int":
            raise ValueError(f"{where}: weights.type={weights.type!r} is not supported (int only)")
        if weights.dynamic:
            raise ValueError(f"{where}: weights.dynamic=true is not supported")
        if weights.actorder not in (None, "static", "weight"):
            raise ValueError(
                f"{where}: weights.actorder={weights.actorder!r} is not supported "
                "(group act-order needs a g_idx permutation; static act-order is fine)"
            )
        if weights.block_structure is not None:
            raise ValueError(f"{where}: weights.block_structure={weights.block_structure!r} is not supported")
        if inputs is not None:
            return self._int8_scheme(where, fmt, weights, inputs)
        return self._wna16_scheme(where, fmt, weights)

    @staticmethod
    def _int8_scheme(where: str, fmt: Optional[str], weights: QuantArgs, inputs: QuantArgs) -> W8A8Int8Scheme:
        checks = [
            ("weights.num_bits", weights.num_bits, 8),
            ("weights.strategy", weights.strategy, "channel"),
            ("weights.symmetric", weights.symmetric, True),
            ("input_activations.type", inputs.type, "int"),
            ("input_activations.num_bits", inputs.num_bits, 8),
            ("input_activations.strategy", inputs.strategy, "token"),
            ("input_activations.dynamic", inputs.dynamic, True),
            ("input_activations.symmetric", inputs.symmetric, True),
        ]
        for field, value, expected in checks:
            if value != expected:
                raise ValueError(
                    f"{where}: {field}={value!r} is not supported for int8 activation quantization "
                    f"(W8A8 needs {field}={expected!r}: per-channel symmetric int8 weights, "
                    "dynamic per-token symmetric int8 activations)"
                )
        if fmt not in (None, "int-quantized", "naive-quantized"):
            raise ValueError(f"{where}: format={fmt!r} is not supported for W8A8 (expected int-quantized)")
        return W8A8Int8Scheme()

    @staticmethod
    def _wna16_scheme(where: str, fmt: Optional[str], weights: QuantArgs) -> WNA16Scheme:
        if weights.num_bits != 4:
            raise ValueError(f"{where}: weights.num_bits={weights.num_bits} is not supported for weight-only (4 only)")
        if fmt not in (None, "pack-quantized"):
            raise ValueError(f"{where}: format={fmt!r} is not supported for W4A16 (expected pack-quantized)")
        if weights.strategy == "group":
            if weights.group_size not in WNA16_GROUP_SIZES:
                raise ValueError(
                    f"{where}: weights.group_size={weights.group_size} is not supported "
                    f"(one of {', '.join(map(str, WNA16_GROUP_SIZES))}, or strategy 'channel')"
                )
            group_size = weights.group_size
        elif weights.strategy == "channel":
            group_size = None
        else:
            raise ValueError(f"{where}: weights.strategy={weights.strategy!r} is not supported (group or channel)")
        return WNA16Scheme(group_size=group_size, symmetric=weights.symmetric)
