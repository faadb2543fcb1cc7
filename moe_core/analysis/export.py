"""Take a routing result home: the trace as JSON or CSV, and the request as a PyTorch snippet.

    trace_json(result, model)            exactly what `moe-lab route --json` prints (the CLI calls it)
    trace_csv(result, model)             one row per token x layer x expert the router chose
    pytorch_snippet(model, request, text) a short script that routes the same text the same way

The JSON trace and the CLI share one function, so a file saved from the
dashboard and the output of the command line can never disagree. The CSV is
meant for spreadsheets, where a cell that starts with "=" is a formula: token
text is neutralised as OWASP recommends (see `spreadsheet_safe`).

Pure Python; no Panel or Bokeh.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import keyword

from ..model.checkpoint import list_checkpoints

# The CSV columns, in order, and what each one means (the app lists them beside the download).
CSV_COLUMNS = {
    "token": "index of the token in the routed text (0-based)",
    "token_text": "the token's text; a ' is put in front when it starts with = + - @ tab, CR or LF "
                  "(OWASP: CSV injection)",
    "char_start": "first character of the token in the text (Python string index, 0-based)",
    "char_end": "one past the token's last character",
    "layer": "MoE layer (0-based)",
    "rank": "1 = the router's first choice for this token, 2 = its second, ...",
    "expert": "expert index (0-based)",
    "weight": "combine weight of this expert in the token's output (0 when dropped)",
    "prob": "router probability (softmax or sigmoid score) of this expert for this token",
    "dropped": "1 when the expert was full (capacity) and did not process the token, else 0",
}

# Characters that make a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")  # OWASP list, plus LF like CR


# JSON keys written before each concept had one name: traces and runs saved then read as today's names
RENAMED_KEYS = {"n_layers": "n_layer", "active": "active_per_token", "published_active": "published_active_per_token",
                "variant": "balancing", "k": "top_k", "cf": "capacity_factor"}


def current_keys(doc):
    """A JSON document saved by an older version, with every renamed key under today's name."""
    if isinstance(doc, dict):
        return {RENAMED_KEYS.get(k, k): current_keys(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [current_keys(v) for v in doc]
    return doc


def trace_dict(result, model) -> dict:
    """The routing trace as a dict: the schema of `moe-lab route --json` (see README)."""
    return result.to_json(model)


def trace_json(result, model) -> str:
    """The routing trace as JSON text, byte for byte what `moe-lab route --json` prints."""
    return json.dumps(trace_dict(result, model), ensure_ascii=False)


def spreadsheet_safe(text: str) -> str:
    """Neutralise a cell a spreadsheet would run as a formula: prefix a single quote (OWASP).

    Excel, LibreOffice and Google Sheets treat a cell that starts with = + - @ (or
    a tab or line break before one) as a formula, so a token such as
    `=HYPERLINK(...)` in a student's text must not reach them unescaped. The
    character offsets in the same row still locate the exact original text.
    """
    return "'" + text if text.startswith(FORMULA_START) else text


def trace_rows(result) -> list[dict]:
    """One dict per (layer, token, expert the router chose), in that order; keys are CSV_COLUMNS.

    "Chose" means before capacity: a choice that was cut because its expert was
    full is a row with dropped = 1 and weight 0, so the rows of a layer add up to
    the router's choices and the kept rows to the expert loads.
    """
    rows = []
    for layer, r in enumerate(result.routings):
        choices, combine = r.choices.tolist(), r.combine.tolist()
        probs, dropped = r.probs.tolist(), r.dropped.tolist()
        for t, tok in enumerate(result.tokens):
            rank = 0
            for e in choices[t]:
                if e < 0:       # padding: this token has fewer choices than the widest one
                    continue
                rank += 1
                rows.append({
                    "token": t, "token_text": tok.text, "char_start": tok.start, "char_end": tok.end,
                    "layer": layer, "rank": rank, "expert": e,
                    "weight": round(combine[t][e], 6),       # same rounding as the JSON trace
                    "prob": round(probs[t][e], 6),
                    "dropped": int(dropped[t][e]),
                })
    return rows


def trace_csv(result, model=None) -> str:
    """The routing trace as CSV (header row = CSV_COLUMNS), safe to open in a spreadsheet.

    `model` is accepted for symmetry with `trace_json`; the CSV holds only the
    per-token rows (the filename and the JSON carry the model and the request).
    """
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\r\n")
    w.writeheader()
    for row in trace_rows(result):
        row["token_text"] = spreadsheet_safe(row["token_text"])
        w.writerow(row)
    return buf.getvalue()


def export_filename(model_name: str, request: dict, ext: str) -> str:
    """e.g. routing-moe-n8-softmax_topk-k2.json (only [A-Za-z0-9._-] survive)."""
    parts = ["routing", model_name, request.get("scheme", "")]
    if request.get("top_k") is not None:
        parts.append(f"k{request['top_k']}")
    if request.get("capacity_factor") is not None:
        parts.append(f"cf{request['capacity_factor']:g}")
    stem = "-".join(p for p in parts if p)
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in stem)
    return f"{stem}.{ext.lstrip('.')}"


def to_bytes(text: str) -> bytes:
    """UTF-8 for a download. A lone surrogate (possible in text pasted into a browser) becomes the
    escape \\udXXX, which JSON reads back as the same character, instead of failing the download."""
    return text.encode("utf-8", errors="backslashreplace")


# ----------------------------------------------------------------------------- snippet


def _model_name_and_config(model, shipped: bool | None):
    """(name, MoEConfig or None, shipped?) from a LoadedModel, a model-info dict or a name."""

    if isinstance(model, str):
        name, config = model, None
    elif isinstance(model, dict):
        name, config = model.get("name"), None
    else:
        name, config = model.name, model.config
    if not isinstance(name, str) or not name:
        raise ValueError(f"cannot tell which model to load from {model!r}")
    if shipped is None:
        shipped = name in {d["name"] for d in list_checkpoints()}
    return name, config, shipped


def _identifier(key) -> str:
    if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
        raise ValueError(f"request option {key!r} is not a Python keyword argument name")
    return key


def _literal(value) -> str:
    """repr() of plain data, checked to read back as the same value (never code)."""
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise ValueError(f"request option value {value!r} is not plain data (numbers, strings, lists, dicts)")
    return text


def pytorch_snippet(model, request: dict, text: str, *, max_tokens: int | None = None,
                    with_layer: bool = True, shipped: bool | None = None) -> str:
    """A short, runnable script that loads the same checkpoint and routes `text` with `request`.

    `model` is a LoadedModel, a model-info dict with "name", or a checkpoint name;
    `request` is RouterState.request() (scheme and, where they apply, top_k and
    capacity_factor). The text is embedded with `repr()`, which always yields a
    valid Python string literal (quotes, backslashes, newlines, triple quotes,
    control and bidi characters are all escaped), so a hostile text can never
    turn into code. `max_tokens` (with truncate=True) is passed on when the app cut a
    long text at that many tokens. With `with_layer`, the snippet ends with the same routing
    on a bare `MoELayer` of the model's shape, for use in one's own model.
    `shipped` says whether the model is a checkpoint in assets/checkpoints
    (None: look it up there).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not isinstance(request, dict) or not request.get("scheme"):
        raise ValueError("request must be a dict with at least a 'scheme' (see RouterState.request())")
    name, config, shipped = _model_name_and_config(model, shipped)
    args = [f"scheme={request['scheme']!r}"]
    if request.get("top_k") is not None:
        args.append(f"top_k={int(request['top_k'])!r}")
    if request.get("capacity_factor") is not None:
        args.append(f"capacity_factor={float(request['capacity_factor'])!r}")
    for key, value in request.items():   # any other route_text option the app passes (e.g. an ablation)
        if key not in ("scheme", "top_k", "capacity_factor") and value not in (None, {}, []):
            args.append(f"{_identifier(key)}={_literal(value)}")
    if max_tokens is not None:
        args.append(f"truncate=True, max_tokens={int(max_tokens)}")

    lines = ["# MoE Router Lab: route a text the way the dashboard did (pip install -e . in the repository)"]
    if shipped:
        lines += ["from moe_core.model.checkpoint import load",
                  "from moe_core.inference import route_text",
                  "",
                  f"model = load({name!r})  # a shipped checkpoint in assets/checkpoints"]
    else:
        lines += ["# This model was trained in your browser session's lab: use the lab's model download",
                  "# (a zip with lab-model.json and lab-model.safetensors), unzipped next to this script.",
                  "# The file stores weights in float16, so a near-tie between two experts may route differently.",
                  "from moe_core.model.checkpoint import load_file",
                  "from moe_core.inference import route_text",
                  "",
                  f"model = load_file({name!r})"]
    lines += [f"text = {text!r}",
              f"result = route_text(model, text, {', '.join(args)})",
              "",
              "for layer, routing in enumerate(result.routings):",
              "    print(f\"layer {layer}: tokens per expert {routing.load.tolist()}\")",
              "print(\"experts of the first token, layer 0:\", result.layer_dict(0)[\"experts\"][0])"]
    if with_layer and config is not None:
        layer_args = [f"d_model={config.d_model}", f"d_ff={config.d_ff}", f"n_experts={config.n_experts}"]
        if request.get("top_k") is not None:
            layer_args.append(f"top_k={int(request['top_k'])}")
        layer_args.append(f"scheme={request['scheme']!r}")
        if config.n_shared:
            layer_args.append(f"n_shared={config.n_shared}")
        if config.activation != "swiglu":
            layer_args.append(f"activation={config.activation!r}")
        if request.get("capacity_factor") is not None:
            layer_args.append(f"capacity_factor={float(request['capacity_factor'])!r}")
        lines += ["",
                  "# The same routing on a bare, freshly initialised layer of this model's shape:",
                  "import torch",
                  "from moe_core.model.layer import MoELayer",
                  "",
                  f"layer = MoELayer({', '.join(layer_args)}).eval()",
                  f"y, routing = layer(torch.randn(len(result.tokens), {config.d_model}))  # y: [tokens, d_model]"]
    return "\n".join(lines) + "\n"


__all__ = ["CSV_COLUMNS", "trace_dict", "trace_json", "trace_csv", "trace_rows", "spreadsheet_safe",
           "export_filename", "to_bytes", "pytorch_snippet"]
