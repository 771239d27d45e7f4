from pymllm.configs.errors import ConfigError
from pymllm.configs.global_config import GlobalConfig, make_parser, parse_config
from pymllm.configs.server_config import ServerConfig

__all__ = ["ConfigError", "GlobalConfig", "ServerConfig", "make_parser", "parse_config"]
