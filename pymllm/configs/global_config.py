"""GlobalConfig groups the dataclass configs; the CLI is generated from their fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pymllm.configs.errors import ConfigError
from pymllm.configs.quantization_config import QuantizationConfig
from pymllm.configs.server_config import ServerConfig

# Each CLI group is a dataclass; flags are spelled --<group>.<field>.
_GROUPS = {"server": ServerConfig, "quantization": QuantizationConfig}


@dataclass
class GlobalConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def validate(self) -> None:
        for name in _GROUPS:
            getattr(self, name).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _parse_bool(flag: str):
    def parse(text: str) -> bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"{flag}: expected a boolean, got {text!r}")

    return parse


def _typed_parser(flag: str, tp: type):
    def parse(text: str):
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}: expected {tp.__name__}, got {text!r}"
            ) from None

    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --group.field flag per dataclass field of every config group."""
    for group_name, cls in _GROUPS.items():
        group = parser.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f"--{group_name}.{f.name}"
            tp, _ = _unwrap_optional(hints[f.name])
            kwargs: dict = {"dest": f"{group_name}.{f.name}", "default": argparse.SUPPRESS}
            kwargs["help"] = f.metadata.get("help", "")
            if tp is bool:
                # `--server.disable_x` alone means true; `--server.disable_x false` is allowed.
                kwargs.update(nargs="?", const=True, type=_parse_bool(flag))
            else:
                kwargs["type"] = _typed_parser(flag, tp)
            group.add_argument(flag, **kwargs)


class _ErrorRaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would sys.exit(2) without context
        raise ConfigError(message)


def make_parser(prog: Optional[str] = None, raise_errors: bool = False) -> argparse.ArgumentParser:
    cls = _ErrorRaisingParser if raise_errors else argparse.ArgumentParser
    parser = cls(prog=prog)
    add_config_arguments(parser)
    return parser


def config_from_namespace(ns: argparse.Namespace) -> GlobalConfig:
    groups = {name: {} for name in _GROUPS}
    for key, value in vars(ns).items():
        if "." in key:
            group, name = key.split(".", 1)
            if group in groups:
                groups[group][name] = value
    cfg = GlobalConfig(**{name: _GROUPS[name](**kw) for name, kw in groups.items()})
    cfg.validate()
    return cfg


def parse_config(argv: Optional[Sequence[str]] = None) -> GlobalConfig:
    """Parse CLI flags into a validated GlobalConfig; raises ConfigError on bad input."""
    parser = make_parser(raise_errors=True)
    ns = parser.parse_args(list(argv) if argv is not None else None)
    return config_from_namespace(ns)
