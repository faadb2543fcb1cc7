"""moe_core: a small, readable Mixture-of-Experts toolkit in pure PyTorch.

Nothing in this package imports Panel or Bokeh: the dashboard in ``app/`` reads
everything it shows from here.
"""
