"""Checkpoints: safetensors weights (fp16) + a JSON file with the config and the model card.

No pickle anywhere: weights load through safetensors, metadata through JSON,
both with size limits and schema checks, so a checkpoint file cannot run code.
Writes are atomic (temp file + rename), so a crash never leaves half a file.

    assets/checkpoints/NAME.safetensors   the weights
    assets/checkpoints/NAME.json          {"name", "config", "recipe", "card"}
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .gpt import MoEConfig, MoEGPT

ASSETS = Path(os.environ.get("MOE_LAB_ASSETS", Path(__file__).resolve().parents[2] / "assets"))
CHECKPOINT_DIR = ASSETS / "checkpoints"
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024   # refuse bigger weight files
MAX_JSON_BYTES = 1024 * 1024             # refuse bigger metadata files
FORMAT = "moe-router-lab/1"
TIED = ("lm_head.weight",)               # tied to wte.weight, stored once


@dataclass
class LoadedModel:
    name: str
    model: MoEGPT
    config: MoEConfig
    recipe: dict
    card: dict

    @property
    def trained(self) -> bool:
        return bool(self.card.get("steps", 0))

    def info(self) -> dict:
        """The "model" block of `moe-lab route --json`."""
        return {
            "name": self.name,
            "n_experts": self.config.n_experts,
            "top_k_trained": self.config.top_k if self.config.scheme not in ("switch", "base") else 1,
            "scheme_trained": self.config.scheme,
            "n_layer": self.config.n_layer,
            "trained": self.trained,
            "recipe": self.recipe.get("balancing", "unknown"),
        }


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: MoEGPT, path: str | Path, *, name: str, recipe: dict, card: dict, dtype=torch.float16) -> Path:
    """Write NAME.safetensors + NAME.json next to each other (path without suffix)."""
    stem = Path(path).with_suffix("")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items() if k not in TIED}
    meta = {"format": FORMAT, "name": name}
    _atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(state, tmp, metadata=meta))
    doc = {"format": FORMAT, "name": name, "config": model.config.to_dict(), "recipe": recipe, "card": card}
    text = json.dumps(doc, indent=2, sort_keys=True)

    def write_json(tmp):
        Path(tmp).write_text(text + "\n", encoding="utf-8")

    _atomic_write(stem.with_suffix(".json"), write_json)
    return stem


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"no checkpoint metadata at {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_JSON_BYTES // 1024} KB; not a moe-router-lab checkpoint")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a moe-router-lab checkpoint (format must be {FORMAT!r})")
    for key, kind in (("name", str), ("config", dict), ("recipe", dict), ("card", dict)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"{path.name}: field {key!r} missing or not a {kind.__name__}")
    return doc


def load_file(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint from NAME.json / NAME.safetensors (either path, or the stem)."""
    stem = Path(path).with_suffix("")
    doc = _read_json(stem.with_suffix(".json"))
    try:
        config = MoEConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{stem.name}: bad model config: {e}") from None
    weights = stem.with_suffix(".safetensors")
    if not weights.is_file():
        raise ValueError(f"{stem.name}: weights file {weights.name} is missing")
    if weights.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{weights.name} is larger than {MAX_WEIGHTS_BYTES >> 20} MB; refusing to load it")
    model = MoEGPT(config)
    expected = {k: v for k, v in model.state_dict().items() if k not in TIED}
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
            missing, extra = set(expected) - keys, keys - set(expected)
            if missing or extra:
                raise ValueError(f"{weights.name} does not match its config: "
                                 f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
            state = {}
            for k in expected:
                t = f.get_tensor(k)
                if t.shape != expected[k].shape:
                    raise ValueError(f"{weights.name}: {k} has shape {tuple(t.shape)}, config needs {tuple(expected[k].shape)}")
                if not torch.isfinite(t.float()).all():
                    raise ValueError(f"{weights.name}: {k} contains NaN or infinity")
                state[k] = t.to(expected[k].dtype)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{weights.name} is not a valid safetensors file: {e}") from None
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(doc["name"], model, config, doc["recipe"], doc["card"])


def list_checkpoints(directory: Path = CHECKPOINT_DIR) -> list[dict]:
    """Metadata of every checkpoint in `directory` (sorted by the recipe's display order)."""
    out = []
    for p in sorted(directory.glob("*.json")):
        try:
            doc = _read_json(p)
        except ValueError:
            continue
        if p.with_suffix(".safetensors").is_file():
            out.append({"name": doc["name"], "config": doc["config"], "recipe": doc["recipe"], "card": doc["card"],
                        "bytes": p.with_suffix(".safetensors").stat().st_size})
    return sorted(out, key=lambda d: (d["recipe"].get("order", 99), d["name"]))


_cache: dict[tuple[str, str], LoadedModel] = {}
_lock = threading.Lock()


def load(name: str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """A shipped checkpoint by name, loaded once per process and shared (read-only)."""
    names = [d["name"] for d in list_checkpoints()]
    if name not in names:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names) or '(none: run moe-lab train)'}")
    key = (name, str(device))
    with _lock:
        if key not in _cache:
            _cache[key] = load_file(CHECKPOINT_DIR / name, device=device)
        return _cache[key]
