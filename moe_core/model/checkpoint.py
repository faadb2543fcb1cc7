"""Checkpoints: safetensors weights (fp16) + a JSON file with the config and the model card.

No pickle anywhere: weights load through safetensors, metadata through JSON,
both with size limits and schema checks, so a checkpoint file cannot run code.
Writes are atomic (temp file + rename), so a crash never leaves half a file.

A checkpoint may come from outside (a classmate's lab download), so everything
is checked before it costs anything: the JSON's size and nesting depth, then
the config (types, ranges, and the parameter count it implies, computed from
the numbers, against a memory budget), then the safetensors header (tensor
names, shapes and dtypes against the config, without loading a tensor), then
the sha256 of the weights file against the one its card recorded at save time;
only then are tensors read and the model built.

    assets/checkpoints/NAME.safetensors   the weights
    assets/checkpoints/NAME.json          {"name", "config", "recipe", "card"}
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .gpt import MoEConfig, MoEGPT

ASSETS = Path(os.environ.get("MOE_LAB_ASSETS", Path(__file__).resolve().parents[2] / "assets"))
CHECKPOINT_DIR = ASSETS / "checkpoints"
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024   # refuse bigger weight files
MAX_JSON_BYTES = 1024 * 1024             # refuse bigger metadata files
MAX_JSON_DEPTH = 32                      # refuse deeper JSON nesting (ours is 4 deep)
MAX_HEADER_BYTES = 1024 * 1024           # refuse bigger safetensors headers
MAX_PARAMS = MAX_WEIGHTS_BYTES // 2      # the most parameters a weights file under the cap holds (float16)
MAX_LAYERS = 256                         # structural caps: building the module tree costs time per layer
MAX_EXPERTS = 4096
LOAD_BYTES_PER_PARAM = 8                 # while loading: file bytes (2) + decoded float16 (2) + float32 model (4)
WEIGHT_DTYPES = ("F16", "BF16", "F32")   # what save() writes; anything else (int8, ...) is refused
FORMAT = "moe-router-lab/1"
TIED = ("lm_head.weight",)               # tied to wte.weight, stored once
SHA_KEY = "weights_sha256"               # card field: sha256 of the .safetensors file, written by save()
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")   # no dots: NAME.json / NAME.safetensors

log = logging.getLogger(__name__)


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


def check_name(name) -> str:
    """`name` if it is a plain checkpoint name (letters, digits, '_', '-'; so no path, no '..'), else ValueError."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ValueError(f"checkpoint name {shown} is not a plain name (letters, digits, '_' and '-', "
                         f"at most 100 characters: no path separators, no dots)")
    return name


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: MoEGPT, path: str | Path, *, name: str, recipe: dict, card: dict, dtype=torch.float16) -> Path:
    """Write NAME.safetensors + NAME.json next to each other (path without suffix).
    The card gets the weights file's sha256 (SHA_KEY), which load_file verifies."""
    check_name(name)
    stem = Path(path).with_suffix("")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items() if k not in TIED}
    meta = {"format": FORMAT, "name": name}
    digest = {}

    def write_weights(tmp):
        save_file(state, tmp, metadata=meta)
        digest["sha256"] = _sha256_file(tmp)

    _atomic_write(stem.with_suffix(".safetensors"), write_weights)
    card = {**card, SHA_KEY: digest["sha256"]}
    doc = {"format": FORMAT, "name": name, "config": model.config.to_dict(), "recipe": recipe, "card": card}
    text = json.dumps(doc, indent=2, sort_keys=True)

    def write_json(tmp):
        Path(tmp).write_text(text + "\n", encoding="utf-8")

    _atomic_write(stem.with_suffix(".json"), write_json)
    return stem


# ----------------------------------------------------------------------------- JSON from disk

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def parse_json(text: str, *, max_depth: int = MAX_JSON_DEPTH, what: str = "the JSON"):
    """json.loads with a nesting limit checked BEFORE parsing (a 100k-deep file would otherwise raise
    RecursionError from inside the parser). Bad input raises ValueError naming `what`."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))          # brackets outside strings
    depth = max(accumulate(_DEPTH_STEP[c] for c in brackets), default=0)
    if depth > max_depth:
        raise ValueError(f"{what} is nested {depth} levels deep (the limit is {max_depth})")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, too-long integers, deep nesting all the same
        raise ValueError(f"{what} is not valid JSON: {str(e)[:200]}") from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """A JSON file read with limits: at most `max_bytes` bytes (never reads more), UTF-8, at most
    `max_depth` levels of nesting. Anything else raises ValueError with one clear sentence."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{path.name} is larger than {_size(max_bytes)}; refusing to read it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not valid JSON: it is not UTF-8 text") from None
    return parse_json(text, max_depth=max_depth, what=path.name)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _read_json(path: Path) -> dict:
    """A checkpoint's NAME.json: limited read, then the schema (format, a plain name, the four blocks)."""
    if not path.is_file():
        raise ValueError(f"no checkpoint metadata at {path}")
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a moe-router-lab checkpoint (format must be {FORMAT!r})")
    for key, kind in (("name", str), ("config", dict), ("recipe", dict), ("card", dict)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"{path.name}: field {key!r} missing or not a {kind.__name__}")
    try:
        check_name(doc["name"])
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    return doc


# ----------------------------------------------------------------------------- checks before any tensor


def _available_memory() -> int | None:
    """Bytes this process could still allocate: MemAvailable, lowered by a cgroup (container) limit."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            avail = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return None if avail is None else max(avail, 0)


def param_budget(*, memory: bool = True) -> tuple[int, str]:
    """(the most parameters a checkpoint may have, why). MAX_PARAMS (what a weights file under
    MAX_WEIGHTS_BYTES holds in float16), lowered to half of the available memory at
    LOAD_BYTES_PER_PARAM bytes per parameter when `memory`."""
    limit, why = MAX_PARAMS, f"a {_size(MAX_WEIGHTS_BYTES)} weights file holds at most that in float16"
    avail = _available_memory() if memory else None
    if avail is not None and avail // (2 * LOAD_BYTES_PER_PARAM) < limit:
        limit = avail // (2 * LOAD_BYTES_PER_PARAM)
        why = (f"half of the {_size(avail)} of memory available now, at {LOAD_BYTES_PER_PARAM} bytes "
               f"per parameter while loading")
    return limit, why


def check_config(raw, *, label: str = "checkpoint", memory: bool = True) -> MoEConfig:
    """A MoEConfig from an untrusted dict, refused (ValueError) before anything is allocated when a
    field has the wrong type or range, or the parameters it implies exceed `param_budget`."""
    try:
        config = MoEConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{label}: bad model config: {e}") from None
    if config.n_layer > MAX_LAYERS or config.n_experts > MAX_EXPERTS:
        raise ValueError(f"{label}: bad model config: at most {MAX_LAYERS} layers and {MAX_EXPERTS} experts, "
                         f"got n_layer = {config.n_layer}, n_experts = {config.n_experts}")
    n = config.param_count()
    limit, why = param_budget(memory=memory)
    if n > limit:
        raise ValueError(f"{label}: its config implies {n:,} parameters ({_size(4 * n)} as float32), "
                         f"over the limit of {limit:,} ({why}); refusing to load it")
    return config


def _parse_header(head: bytes, file_size: int, label: str) -> tuple[int, dict]:
    """(header length, header dict) from the first 8 + n bytes of a safetensors file."""
    if len(head) < 8:
        raise ValueError(f"{label} is not a valid safetensors file: too short")
    n = int.from_bytes(head[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise ValueError(f"{label} is not a valid safetensors file: header length {n}")
    if len(head) < 8 + n:
        raise ValueError(f"{label} is not a valid safetensors file: truncated header")
    try:
        text = head[8:8 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{label} is not a valid safetensors file: header is not UTF-8") from None
    header = parse_json(text, max_depth=4, what=f"the header of {label}")
    if not isinstance(header, dict):
        raise ValueError(f"{label} is not a valid safetensors file: header is not an object")
    return n, header


def check_header(header: dict, config: MoEConfig, label: str) -> None:
    """Tensor names, shapes and dtypes of a safetensors header against what `config` needs."""
    expected = config.state_shapes()
    found = {k: v for k, v in header.items() if k != "__metadata__"}
    missing, extra = set(expected) - set(found), set(found) - set(expected)
    if missing or extra:
        raise ValueError(f"{label} does not match its config: "
                         f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for k, shape in expected.items():
        entry = found[k]
        if not isinstance(entry, dict):
            raise ValueError(f"{label} is not a valid safetensors file: entry {k!r} is not an object")
        dtype = entry.get("dtype")
        if dtype not in WEIGHT_DTYPES:
            shown = dtype if isinstance(dtype, str) and len(dtype) < 20 else type(dtype).__name__
            raise ValueError(f"{label}: {k} is stored as {shown}; weights must be one of "
                             f"{', '.join(WEIGHT_DTYPES)}")
        got = entry.get("shape")
        if not isinstance(got, list) or tuple(got) != shape:
            raise ValueError(f"{label}: {k} has shape {_short(got)}, config needs {shape}")


def _short(v) -> str:
    t = repr(tuple(v)) if isinstance(v, list) else repr(v)
    return t if len(t) <= 60 else t[:57] + "..."


def _check_weights_file(weights: Path, config: MoEConfig, label: str) -> int:
    """Size and header of the weights file (reads the header only); returns the file size."""
    if not weights.is_file():
        raise ValueError(f"{label}: weights file {weights.name} is missing")
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{weights.name} is larger than {MAX_WEIGHTS_BYTES >> 20} MB; refusing to load it")
    with open(weights, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            head += f.read(min(int.from_bytes(head, "little"), MAX_HEADER_BYTES))
    check_header(_parse_header(head, size, weights.name)[1], config, weights.name)
    return size


# ----------------------------------------------------------------------------- load


def load_file(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint from NAME.json / NAME.safetensors (either path, or the stem).

    Checked in this order, each before the next costs anything: the JSON (size, depth, schema, a plain
    name), the config (types, ranges, parameter count against `param_budget`), the weights file's size
    and safetensors header (names, shapes, dtypes), its sha256 against the card's SHA_KEY, the values
    (finite). Any failure is a ValueError with one sentence."""
    stem = Path(path).with_suffix("")
    doc = _read_json(stem.with_suffix(".json"))
    config = check_config(doc["config"], label=stem.name)
    weights = stem.with_suffix(".safetensors")
    size = _check_weights_file(weights, config, stem.name)
    want = doc["card"].get(SHA_KEY)
    if not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ValueError(f"{stem.name}: the model card has no valid {SHA_KEY} (a checksum of the weights, "
                         f"written by save()); refusing unverified weights")
    elems = sum(torch.Size(s).numel() for s in config.state_shapes().values())
    limit = min(MAX_WEIGHTS_BYTES, 8 + MAX_HEADER_BYTES + 4 * elems)   # float32 at most, plus the header
    if size > limit:
        raise ValueError(f"{weights.name} is {_size(size)}, more than its config's {elems:,} values can take")
    with open(weights, "rb") as f:            # one read: the bytes hashed are the bytes loaded
        data = f.read(limit + 1)
    if hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{weights.name} does not match the {SHA_KEY} in its model card: the file is damaged "
                         f"or was changed after it was saved")
    _, header = _parse_header(data, len(data), weights.name)
    check_header(header, config, weights.name)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights.name} is not a valid safetensors file: {str(e)[:200]}") from None
    del data
    model = MoEGPT(config)
    expected = {k: v for k, v in model.state_dict().items() if k not in TIED}
    state = {}
    for k, t in tensors.items():
        if t.shape != expected[k].shape:    # the header was checked; this is belt and braces
            raise ValueError(f"{weights.name}: {k} has shape {tuple(t.shape)}, config needs {tuple(expected[k].shape)}")
        state[k] = t.to(expected[k].dtype)
        if not torch.isfinite(state[k]).all():
            raise ValueError(f"{weights.name}: {k} contains NaN or infinity")
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(doc["name"], model, config, doc["recipe"], doc["card"])


# ----------------------------------------------------------------------------- the checkpoints folder

_warned: set[tuple[str, str]] = set()


def _skip(path: Path, reason: str) -> None:
    """One warning line per bad file and reason (not on every listing)."""
    key = (str(path), reason)
    if key not in _warned:
        _warned.add(key)
        log.warning("skipping checkpoint %s: %s", path.name, " ".join(reason.split()))


def list_checkpoints(directory: Path | None = None) -> list[dict]:
    """Metadata of every checkpoint in `directory` (default CHECKPOINT_DIR), sorted by the recipe's
    display order. A file that fails the checks load_file makes before reading tensors (JSON, a plain
    name equal to the file name, the config, the weights' size and header) is skipped with one
    warning line (logging); the rest still list."""
    directory = Path(CHECKPOINT_DIR if directory is None else directory)
    out = []
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError as e:
        log.warning("cannot list checkpoints in %s: %s", directory, e)
        return []
    for p in paths:
        try:
            doc = _read_json(p)
            if doc["name"] != p.stem:
                raise ValueError(f"its name {doc['name']!r} is not its file name {p.stem!r}")
            config = check_config(doc["config"], label=p.stem, memory=False)
            size = _check_weights_file(p.with_suffix(".safetensors"), config, p.stem)
        except (ValueError, OSError) as e:
            _skip(p, str(e))
            continue
        out.append({"name": doc["name"], "config": config.to_dict(), "recipe": doc["recipe"], "card": doc["card"],
                    "bytes": size})
    return sorted(out, key=lambda d: (_order(d["recipe"].get("order")), d["name"]))


def _order(v) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else 99


_cache: dict[tuple[str, str], LoadedModel] = {}
_lock = threading.Lock()


def load(name: str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """A shipped checkpoint by name (a plain name, never a path), loaded once per process and shared (read-only)."""
    check_name(name)
    key = (name, str(device))
    with _lock:
        if key in _cache:
            return _cache[key]
    names = [d["name"] for d in list_checkpoints()]
    if name not in names:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names) or '(none: run moe-lab train)'}")
    with _lock:
        if key not in _cache:
            _cache[key] = load_file(Path(CHECKPOINT_DIR) / name, device=device)
        return _cache[key]
