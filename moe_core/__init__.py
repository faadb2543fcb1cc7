"""moe_core: a small, readable Mixture-of-Experts toolkit in pure PyTorch.

Nothing in this package imports Panel or Bokeh: the dashboard in ``app/`` reads
everything it shows from here.

The main pieces are importable from the package itself::

    from moe_core import MoELayer, route, SCHEMES
    layer = MoELayer(d_model=64, d_ff=128, n_experts=8, top_k=2)
    y, routing = layer(x)

They load on first use (PEP 562), so ``import moe_core`` alone, as the CLI's
argument parsing does, does not import torch.
"""

from importlib import import_module

# public name -> the submodule that defines it
_EXPORTS = {
    "MoELayer": "model.layer", "DenseFFN": "model.layer", "pick_device": "model.layer",
    "Routing": "model.routing", "route": "model.routing", "SCHEMES": "model.routing", "z_loss": "model.routing",
    "load_balance_loss": "model.routing", "update_bias": "model.routing", "expert_capacity": "model.routing",
    "softmax_topk": "model.routing", "noisy_topk": "model.routing", "switch": "model.routing", "gshard": "model.routing",
    "expert_choice": "model.routing", "base": "model.routing", "deepseek": "model.routing",
    "MoEConfig": "model.gpt", "MoEGPT": "model.gpt",
    "count_params": "model.params", "ParamReport": "model.params", "RoutingRequest": "model.request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
