"""Small file helpers: atomic output directories, JSON, fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def check_output_dir(out: str | os.PathLike, force: bool = False, inputs: tuple = ()) -> Path:
    """Refuse an existing output (without force) and an output inside an input model's directory."""
    out = Path(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        if not inp.exists():
            continue
        inp = inp.resolve()
        inp_dir = inp if inp.is_dir() else inp.parent
        if out == inp_dir or inp_dir in out.parents:
            raise UsageError(
                f"output {out} is inside the input model's directory {inp_dir}; choose an output elsewhere"
            )
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; pass --force to replace it or choose another --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, inputs: tuple = ()):
    """Yield a temporary directory next to `out`; rename it to `out` only when the block finishes."""
    out = check_output_dir(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, out)


def replace_path(src: Path, dst: Path) -> None:
    """Move src to dst, replacing dst (file or directory) only after src is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(src, dst)


def write_json(path: str | os.PathLike, obj, atomic: bool = True) -> None:
    path = Path(path)
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    if not atomic:
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_path(path: str | os.PathLike) -> dict:
    """A stable fingerprint of a model file or directory: sha256 over the names and hashes of its files."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return {"path": str(path), "sha256": h.hexdigest(), "files": len(files)}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """One JSON object per line (blank lines skipped); a bad line is a UsageError naming file and line."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n} is not valid JSON ({e.msg}); one JSON object per line expected") from e
        if not isinstance(rec, dict):
            raise UsageError(f"{path}:{n} is not a JSON object; one object per line expected")
        rows.append(rec)
    if not rows:
        raise UsageError(f"{path} holds no records")
    return rows
