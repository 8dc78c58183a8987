"""The setup the speed benchmarks share (bench_speed.py, bench_quantized.py, bench_speed_repeat.py): SmolLM2 with
blocks removed, ONNX exports, and onnxruntime-genai's model-builder output, each made once into the work dir and
reused when already there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# the PPL criterion's first 6 removals on SmolLM2 (10 x 128 calibration tokens, first 4 and last 2 protected)
DEFAULT_BLOCKS = [12, 13, 14, 15, 17, 26]


def prepare(model: str, work: Path, blocks: list[int], exports: dict, genai: tuple[str, str] | None = None,
            pruned: str | None = None) -> dict[str, Path]:  # fmt: skip
    """Prune `blocks` of `model` into work/pruned (unless `pruned` is given); export {dir name: (source, optimize)}
    (source "original" or "pruned") to work/<dir name>; build onnxruntime-genai's model of the pruned checkpoint
    into work/<genai[0]> at precision genai[1]. Returns {"original", "pruned", each dir name, genai[0]: path}."""
    from shortened.converter.steps import prune
    from shortened.exporters.onnx import export_onnx

    paths = {"original": Path(model), "pruned": Path(pruned) if pruned else work / "pruned"}
    if not (paths["pruned"] / "config.json").is_file():
        print(f"pruning blocks {blocks} -> {paths['pruned']}", file=sys.stderr)
        prune(model, paths["pruned"], blocks=blocks, progress=False)
    for name, (source, optimize) in exports.items():
        paths[name] = work / name
        if not (paths[name] / "export.json").is_file():
            print(f"exporting {source} -> {paths[name]}", file=sys.stderr)
            export_onnx(str(paths[source]), paths[name], precision="fp32", cache=True, optimize=optimize, force=True)
    if genai:
        paths[genai[0]] = build_genai(paths["pruned"], work, *genai)
    return paths


def build_genai(checkpoint: Path, work: Path, name: str, precision: str) -> Path:
    """onnxruntime-genai's model builder on `checkpoint` (CPU) into work/<name>, with the checkpoint's config.json
    beside it (our loop reads the cache dims from it)."""
    out = work / name
    if (out / "genai_config.json").is_file():
        return out
    print(f"building the onnxruntime-genai model -> {out}", file=sys.stderr)
    tmp = work / ".genai-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"onnxruntime-genai model builder failed:\n{r.stderr[-2000:]}")
    shutil.copy(checkpoint / "config.json", tmp / "config.json")
    tmp.rename(out)
    return out
