"""The versions a record names: this tool's, Python's, the platform's and those of the installed packages."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from shortened import __version__

EXPORT_PACKAGES = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "optimum-onnx")
RUN_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt", "peft")


def versions(packages=RUN_PACKAGES, environment: bool = False) -> dict:
    """{package: version} of the installed `packages` (absent ones left out), after shortened's, Python's and the
    platform's with `environment`. export.json names EXPORT_PACKAGES; the convert manifest's "tool" all of it."""
    out = {"shortened": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    out = out if environment else {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
