"""mtad.toml: the schema (`schema`), its loader (`load`) and the checks behind `mtad --check`."""

from mtad.config.load import ConfigError, check_config, load_config, loads_config
from mtad.config.schema import Config

__all__ = ["Config", "ConfigError", "check_config", "load_config", "loads_config"]
