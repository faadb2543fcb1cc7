"""How a call routes its tokens: one record from the URL, the CLI and the UI down to every MoE layer.

    request = RoutingRequest.make(model.config, scheme="switch", capacity_factor=1.5)
    out = model(ids, request=request)           # every MoE layer routes this way, weights untouched

`make` is the one place a request is checked against a model: a scheme of the zoo, top-k only for the
schemes that take one (1 <= k <= N), a capacity factor only for the schemes that have a capacity, and
switched-off experts (an ablation) that exist and leave enough experts for k. Whatever the scheme does not
use is left None, so two requests that route the same way are equal (and make the same cache key).
A lone `MoELayer` called with keyword overrides makes its request with the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

from .routing import MAX_CAPACITY_FACTOR, get_scheme


@dataclass(frozen=True)
class RoutingRequest:
    scheme: str
    top_k: int | None = None                  # experts per token, for schemes that take a top-k
    capacity_factor: float | None = None      # for schemes with a capacity
    disabled_experts: tuple[tuple[int, tuple[int, ...]], ...] = ()   # ((layer, (experts switched off)), ...)

    @classmethod
    def make(cls, config, scheme: str | None = None, top_k: int | None = None,
             capacity_factor: float | None = None, disabled_experts: dict | None = None) -> RoutingRequest:
        """Check the choices against `config` (a MoEConfig, or a MoELayer: n_experts, scheme, top_k,
        capacity_factor) and fill in its defaults. Raises ValueError with a sentence a student can act on."""
        n = config.n_experts
        scheme = config.scheme if scheme is None else scheme
        s = get_scheme(scheme)
        k = None
        if s.uses_k:
            k = config.top_k if top_k is None else top_k
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
                raise ValueError(f"top-k must be between 1 and N = {n} (the model's experts), got {k!r}")
        elif top_k is not None and top_k != s.fixed_k:
            what = f"always uses {s.fixed_k} expert(s) per token" if s.fixed_k else "has no top-k (experts choose tokens)"
            raise ValueError(f"{s.label} {what}; top-k = {top_k} does not apply")
        cf = None
        if s.uses_capacity:
            cf = capacity_factor
            if cf is None:
                own = getattr(config, "capacity_factor", None) if scheme == config.scheme else None
                cf = own or s.default_capacity_factor
            if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0 < cf <= MAX_CAPACITY_FACTOR:
                raise ValueError(f"capacity factor must be a number in (0, {MAX_CAPACITY_FACTOR}], got {cf!r}")
            cf = float(cf)
        elif capacity_factor is not None:
            raise ValueError(f"{s.label} has no capacity; the capacity factor does not apply")
        need = k if s.uses_k else (s.fixed_k or 1)
        what = f"top-k = {k}" if s.uses_k else f"{s.label} ({need} expert(s) per token)"
        off = _check_disabled(disabled_experts, getattr(config, "n_layer", 1), n, need, what)
        return cls(scheme, k, cf, off)

    def disabled(self, layer: int) -> tuple[int, ...]:
        """The experts switched off in `layer` (empty: none)."""
        return dict(self.disabled_experts).get(layer, ())

    def as_dict(self) -> dict:
        """The choices that apply, under their one name (CLI JSON, URLs, exports)."""
        d = {"scheme": self.scheme}
        if self.top_k is not None:
            d["top_k"] = self.top_k
        if self.capacity_factor is not None:
            d["capacity_factor"] = self.capacity_factor
        return d


def _check_disabled(disabled, n_layer: int, n_experts: int, need: int, what: str):
    """{layer: [experts]} -> ((layer, (experts...)), ...), sorted; every layer and expert must exist and
    at least `need` experts (k, or the scheme's fixed number) must stay switched on."""
    if not disabled:
        return ()
    if not isinstance(disabled, dict):
        raise ValueError(f"disabled_experts must be a dict {{layer: [experts]}}, got {type(disabled).__name__}")
    out = []
    for layer, experts in disabled.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layer:
            raise ValueError(f"disabled_experts: layer {layer!r} does not exist: layers are numbered 0 to {n_layer - 1}")
        if isinstance(experts, (str, bytes)) or not hasattr(experts, "__iter__"):
            raise ValueError(f"disabled_experts must be a list of expert numbers, got {experts!r}")
        off = set()
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n_experts:
                raise ValueError(f"disabled expert {e!r} does not exist: experts are numbered 0 to {n_experts - 1}")
            off.add(e)
        if n_experts - len(off) < need:
            raise ValueError(f"{len(off)} of {n_experts} experts are switched off: {n_experts - len(off)} remain, "
                             f"but {what} needs at least {need}")
        if off:
            out.append((layer, tuple(sorted(off))))
    return tuple(sorted(out))


def resolve(config, request: RoutingRequest | None = None, **choices) -> RoutingRequest:
    """`request` as given, or one made from the keyword choices (scheme, top_k, capacity_factor,
    disabled_experts) for `config`: what the functions that take either call (never both)."""
    if request is None:
        return RoutingRequest.make(config, **choices)
    if any(v is not None for v in choices.values()):
        raise ValueError("give a RoutingRequest or the choices to make one, not both")
    if not isinstance(request, RoutingRequest):
        raise ValueError(f"request must be a RoutingRequest, got {type(request).__name__}")
    return request
