"""The whole build step (`convert`): config in, artifacts + manifest + report out."""

from shortened.pipeline.config import ConvertConfig, load_config_file, make_config
from shortened.pipeline.convert import convert

__all__ = ["ConvertConfig", "convert", "load_config_file", "make_config"]
