"""Small file helpers: atomic outputs (directories and files), JSON, fingerprints, text input.

Output rules (issue 10): an output never equals, contains or lies inside an input (compared on real paths,
symlinks followed); `--force` replaces only an output this tool wrote, recognised by the marker that
`atomic_dir` puts inside every directory it completes (`.shortened-output.json`) and the record `atomic_file`
puts beside every file (`.NAME.shortened.json`, holding the file's sha256); an empty directory holds nothing to
lose and may be replaced too. A stage that gives atomic_dir a key (output_key: its inputs' fingerprints and its
settings) and finds the same key in the marker of an existing output does nothing (`up_to_date`), as make does;
--force is needed only to replace an output made from other inputs or settings. Temporary siblings are named
`.NAME.tmp-PID`; those of dead processes are removed by the next run (and it says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from shortened import __version__
from shortened.errors import UsageError

MARKER = ".shortened-output.json"  # inside every output directory this tool completed


def real_path(p: str | os.PathLike) -> Path:
    """The resolved real path (user expanded, symlinks followed, also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _inputs(inputs) -> list[tuple[str, Path]]:
    """(label, real path) of the inputs that exist; `inputs` is a dict {label: path} or a tuple of paths."""
    items = inputs.items() if isinstance(inputs, dict) else (("input", p) for p in inputs)
    out = []
    for label, p in items:
        if p is None or p == "" or str(p).startswith("hf:"):
            continue
        for one in p if isinstance(p, (list, tuple)) else (p,):
            if one and Path(str(one)).exists():
                out.append((label, real_path(one)))
    return out


def check_no_overlap(out: Path, inputs) -> None:
    """Refuse an output that equals, contains or lies inside an input (all real paths)."""
    for label, inp in _inputs(inputs):
        if out == inp:
            raise UsageError(f"output {out} is the input {label} {inp}; choose an output elsewhere")
        if out in inp.parents:
            raise UsageError(
                f"output {out} contains the input {label} {inp}; writing it would replace the input: "
                "choose an output elsewhere"
            )
        if inp.is_dir() and inp in out.parents:
            raise UsageError(f"output {out} is inside the input {label} {inp}; choose an output elsewhere")


def check_writable(out: Path) -> None:
    """The nearest existing ancestor of `out` must be a writable directory (checked before any work)."""
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"cannot create output {out}: {anc} is not a directory; choose another output")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create output {out}: {anc} is not writable; choose another output")


def file_record(path: Path) -> Path:
    return path.with_name(f".{path.name}.shortened.json")


def is_own_output(path: str | os.PathLike) -> bool:
    """True for a directory holding this tool's marker or an empty directory, and for a file whose record
    beside it holds its current sha256."""
    p = Path(path)
    if p.is_dir():
        return (p / MARKER).is_file() or not any(p.iterdir()) or _legacy_output(p)
    rec = file_record(p)
    if not p.is_file():
        return False
    if not rec.is_file():
        return _legacy_scores(p)
    try:
        return json.loads(rec.read_text()).get("sha256") == sha256_file(p)
    except (OSError, ValueError, AttributeError):
        return False


# records that outputs of versions before the marker hold, and how each names this tool
LEGACY_RECORDS = {
    "pruning.json": lambda r: str(r.get("tool", "")).startswith("shortened"),
    "manifest.json": lambda r: isinstance(r.get("tool"), dict) and "shortened" in r["tool"],
    "export.json": lambda r: r.get("exporter") in ("torch", "optimum") and isinstance(r.get("versions"), dict),
}


def _legacy_output(p: Path) -> bool:
    """An output directory written before the marker existed, recognised by the record it holds."""
    for name, names_us in LEGACY_RECORDS.items():
        try:
            rec = json.loads((p / name).read_text())
            if isinstance(rec, dict) and names_us(rec):
                return True
        except (OSError, ValueError):
            continue
    return False


def _legacy_scores(p: Path) -> bool:
    """A scores.json of a version before the file records: BlockScores.to_dict's keys."""
    if p.suffix != ".json" or p.stat().st_size > 10_000_000:
        return False
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and {"criterion", "scores", "removal_order", "candidates"} <= set(rec)


def check_output(out: str | os.PathLike, force: bool = False, inputs=(), kind: str = "dir") -> Path:
    """Check an output path before any work: not overlapping an input, writable, and replaced only with
    force and only when it is an output of this tool. Returns the real path."""
    out = real_path(out)
    check_no_overlap(out, inputs)
    if out.exists():
        if kind == "file" and out.is_dir():
            raise UsageError(f"output {out} is a directory; pass a file path")
        if kind == "dir" and not out.is_dir():
            raise UsageError(f"output {out} is a file, not an output directory; choose another --out")
        if not force:
            raise UsageError(f"output {out} already exists; pass --force to replace it or choose another --out")
        if not is_own_output(out):
            what = f"it has no {MARKER}" if kind == "dir" else f"no matching {file_record(out).name} beside it"
            raise UsageError(
                f"output {out} is not an output of shortened ({what}); --force replaces only outputs this tool "
                "wrote: choose another --out or remove it yourself"
            )
    check_writable(out)
    return out


def check_output_dir(out: str | os.PathLike, force: bool = False, inputs=()) -> Path:
    """check_output for a directory (kept for callers of the first version)."""
    return check_output(out, force, inputs, kind="dir")


def check_output_file(out: str | os.PathLike, force: bool = False, inputs=()) -> Path:
    return check_output(out, force, inputs, kind="file")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID[-N]` / `.NAME.old-PID` siblings of `out` left by processes that no longer run."""
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)(?:-\d+)?(?:\.\w+)?")
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        m = pattern.fullmatch(p.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        pid = m.group(1)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        print(f"shortened: removed {p}, left by a killed run (process {pid})", file=sys.stderr)
        removed.append(p)
    return removed


def _new_temp(out: Path, is_dir: bool) -> Path:
    for n in range(1000):
        suffix = "" if is_dir else out.suffix  # files keep their suffix (matplotlib picks the format by it)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}" + (f"-{n}" if n else "") + suffix)
        try:
            if is_dir:
                tmp.mkdir()
            elif not tmp.exists() and not tmp.is_symlink():
                return tmp
            else:
                continue
            return tmp
        except FileExistsError:
            continue
    raise UsageError(f"cannot create a temporary name beside {out}")


def _write_failed(e: OSError, out: Path, kept: str = "nothing was kept") -> UsageError:
    """A write that failed after the checks (disk full, quota, read-only): one line with the path and free space."""
    try:
        free = shutil.disk_usage(out.parent if out.parent.exists() else "/").free
        space = f"{free / 2**20:.1f} MiB free"
    except OSError:
        space = "free space unknown"
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}  # fmt: skip
    why = why.get(e.errno, e.strerror)
    return UsageError(f"cannot write {out}: {why} ({space} in {out.parent}); {kept}; free space "
                      "or choose another output")  # fmt: skip


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, inputs=(), key: str | None = None,
               result: dict | None = None):  # fmt: skip
    """Yield a temporary directory next to `out`; it becomes `out` (with this tool's marker inside) only when
    the block finishes. On any error or interrupt the temporary directory is removed. The marker keeps `key`
    (output_key) and `result` (the stage's return value, a dict the block may still fill in) for up_to_date."""
    out = check_output(out, force, inputs, kind="dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = _new_temp(out, is_dir=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        write_marker(tmp, key, result)
        replace_path(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in WRITE_ERRNOS:
            raise _write_failed(e, out) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_marker(directory: str | os.PathLike, key: str | None = None, result: dict | None = None) -> None:

    rec = {"tool": f"shortened {__version__}", "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if key is not None:
        rec.update(key=key, result=result or {})
    (Path(directory) / MARKER).write_text(json.dumps(rec, default=_json_default) + "\n")


def output_key(inputs, settings: dict) -> str:
    """What an output is made from, as one sha256: the inputs' fingerprints (fingerprint_path; a hub id or an
    hf: source by its name), the settings (JSON, keys sorted) and this tool's version. Same key, same output."""

    items = inputs.items() if isinstance(inputs, dict) else (("input", p) for p in inputs)
    prints = {}
    for label, p in items:
        paths = p if isinstance(p, (list, tuple)) else [p]
        prints[label] = [fingerprint_path(x)["sha256"] if x and Path(str(x)).exists() else x for x in paths]
    text = json.dumps({"tool": __version__, "inputs": prints, "settings": settings}, sort_keys=True,
                      default=_key_default)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _key_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    return _json_default(o)


def up_to_date(out: str | os.PathLike, key: str | None, force: bool = False) -> dict | None:
    """The recorded result of `out` when this tool made it with the same key (output_key) and there is no
    --force; it says so on stderr, as make does. None otherwise: the stage runs (and check_output decides)."""
    if key is None or force:
        return None
    try:
        rec = json.loads((real_path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("key") != key or not isinstance(rec.get("result"), dict):
        return None
    print(f"shortened: {out} is up to date", file=sys.stderr)
    return rec["result"]


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, force: bool = False, inputs=()):
    """Yield a temporary path next to `out`; it becomes `out` when the block finishes, with a record beside it
    (`.NAME.shortened.json`: the sha256) that lets a later --force recognise it as this tool's output."""

    out = check_output(out, force, inputs, kind="file")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = _new_temp(out, is_dir=False)
    try:
        yield tmp
        if not tmp.is_file():  # the writer wrote nothing (e.g. no matplotlib for a plot)
            return
        rec = {"tool": f"shortened {__version__}", "sha256": sha256_file(tmp), "file": out.name}
        os.replace(tmp, out)
        rec_tmp = file_record(out).with_name(file_record(out).name + f".tmp-{os.getpid()}")
        rec_tmp.write_text(json.dumps(rec) + "\n")
        os.replace(rec_tmp, file_record(out))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in WRITE_ERRNOS:
            raise _write_failed(e, out) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_output_json(path: str | os.PathLike, obj, force: bool = True, inputs=()) -> None:
    """A JSON output file of a command (a report): replaced only when this tool wrote it (see atomic_file)."""
    with atomic_file(path, force, inputs) as tmp:
        write_json(tmp, obj, atomic=False)


def remove_output_file(path: str | os.PathLike) -> None:
    """Remove an output file of this tool and its record (nothing when absent)."""
    p = Path(path)
    p.unlink(missing_ok=True)
    file_record(p).unlink(missing_ok=True)


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
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


_SHA256: dict = {}  # (path, inode, size, mtime_ns, ctime_ns) -> digest: the keys of convert and its stages hash once


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo in _SHA256:
        return _SHA256[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _SHA256[memo] = h.hexdigest()
    return _SHA256[memo]


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
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
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


def read_text_file(path: str | os.PathLike) -> str:
    """A text input: refused (one line) when it is not valid UTF-8 or mostly control characters (binary)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not text: not valid UTF-8 (at byte {e.start}); pass a UTF-8 text file") from e
    sample = text[:100_000]
    bad = sum(1 for c in sample if not (c.isprintable() or c in "\n\r\t\f\v"))
    if sample and bad > 0.1 * len(sample):
        raise UsageError(
            f"{path} is not text: {bad / len(sample):.0%} of its characters are control characters; pass a text file"
        )
    return text


_HUB_STATE: dict = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (cached per endpoint).

    False in offline mode (HF_HUB_OFFLINE). Used before anything would ask the hub, so that a name that is
    neither a local path nor reachable fails at once instead of after the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if (host, port) not in _HUB_STATE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _HUB_STATE[(host, port)] = True
        except OSError:
            _HUB_STATE[(host, port)] = False
    return _HUB_STATE[(host, port)]
