"""Saving a standard Hugging Face checkpoint that both transformers lines (5.x and 4.57) read the same way."""

from __future__ import annotations

import json
from pathlib import Path


def legacy_rope_fields(cfg: dict) -> dict:
    """The RoPE fields transformers 4.57 reads (`rope_theta`, `rope_scaling`), derived from 5.x's `rope_parameters`.

    transformers 5.x writes only `rope_parameters`; 4.57 reads only `rope_theta` and silently falls back to
    10000 without it, which changes the model. Writing both keeps the checkpoint meaning the same everywhere.
    """
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        return {}  # absent, or nested per attention type (not a flat parameter set)
    out = {"rope_theta": rp["rope_theta"]}
    rope_type = rp.get("rope_type", "default")
    if rope_type != "default":
        out["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if "partial_rotary_factor" in rp and rp["partial_rotary_factor"] != 1.0:
        out["partial_rotary_factor"] = rp["partial_rotary_factor"]
    return out


def make_config_portable(model_dir: str | Path) -> None:
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    extra = {k: v for k, v in legacy_rope_fields(cfg).items() if k not in cfg}
    if extra:
        cfg.update(extra)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> None:
    """save_pretrained (safetensors) + tokenizer + generation config, with a config 4.57 reads identically."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and not (out_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(out_dir)
    make_config_portable(out_dir)
