"""The whole build step (`convert`): config in, artifacts + manifest + report out. build.py runs the steps of
table.py; config.py holds the settings, report.py the gates and report, bench.py the speed step's artifacts."""

from shortened.pipeline.build import convert
from shortened.pipeline.config import ConvertConfig, load_config_file, make_config

__all__ = ["ConvertConfig", "convert", "load_config_file", "make_config"]
