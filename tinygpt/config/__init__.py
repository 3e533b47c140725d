"""Training configuration: typed schema (``schema``) and the YAML loader (``load``)."""

from .inputs import check_paths
from .load import config_to_dict, load_config
from .schema import RunConfig

__all__ = ["RunConfig", "check_paths", "config_to_dict", "load_config"]
