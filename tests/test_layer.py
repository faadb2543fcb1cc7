"""MoE layer: vectorised dispatch == reference loop, call-time overrides, shared experts, devices."""
import hashlib

import pytest
import torch

from moe_core.model.layer import DenseFFN, MoELayer, expert_loop, pick_device
from moe_core.model.routing import SCHEMES


def weights_hash(module):
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def loop_reference(layer, x, routing):
    """The layer's output as DeepSeek-V3's loop computes it (expert_loop, plus the shared experts)."""
    x2 = x.reshape(-1, layer.d_model)
    y = expert_loop(layer.experts, x2, routing.indices, routing.weights)
    return (y if layer.shared is None else y + layer.shared(x2)).view(x.shape), routing


def make_layer(scheme="softmax_topk", **kw):
    torch.manual_seed(0)
    opts = {"capacity_factor": 1.0} if SCHEMES[scheme].uses_capacity else {}
    opts.update(kw)
    return MoELayer(16, 24, 6, 2, scheme=scheme, **opts)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("shape", [(3, 11, 16), (29, 16)])
def test_vectorised_dispatch_equals_reference_loop(scheme, n_shared, shape):
    layer = make_layer(scheme, n_shared=n_shared)
    x = torch.randn(*shape)
    y, r = layer(x, torch.arange(x[..., 0].numel()).view(shape[:-1]) % 7)     # token ids: for hash routing
    y_ref, _ = loop_reference(layer, x, r)
    assert y.shape == x.shape
    assert torch.allclose(y, y_ref, atol=1e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("threaded", [False, True])
def test_inference_path_equals_reference_loop(mode, activation, threaded, monkeypatch):
    """With autograd off the experts write into one buffer and scale it in place (the dashboard's and
    bench's path); it must give the training path's numbers, on one thread and on the expert threads."""
    import moe_core.perf.experts as L

    if threaded:
        monkeypatch.setattr(L, "PARALLEL_MIN_EXPERTS", 2)
        monkeypatch.setattr(L, "PARALLEL_MIN_ROWS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threaded else 1)
    try:
        torch.manual_seed(0)
        layer = MoELayer(16, 24, 6, 2, n_shared=1, activation=activation)
        x = torch.randn(3, 40, 16)
        y_grad, r = layer(x)                             # autograd on: the training path
        y_ref, _ = loop_reference(layer, x, r)
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with ctx:
            y, r2 = layer(x)
        assert y.grad_fn is None and torch.equal(r2.indices, r.indices)
        # the forward pass reads the sparse routing only: no dense [T, N] view was built for it
        assert all(r2.__dict__[f"_{v}"] is None for v in ("combine", "dispatch", "dropped"))
        torch.testing.assert_close(y, y_grad.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_reference_loop_matches_the_textbook_formula():
    layer = make_layer(n_shared=1)
    x = torch.randn(7, 16)
    y, r = layer(x)
    expected = torch.stack([
        sum(r.combine[t, e] * layer.experts.expert(e, x[t : t + 1])[0] for e in range(6)) + layer.shared(x[t : t + 1])[0]
        for t in range(7)
    ])
    assert torch.allclose(y, expected, atol=1e-6)


def test_expert_is_swiglu():
    layer = make_layer()
    x = torch.randn(5, 16)
    w = layer.experts.w_in[2]
    gate, up = (x @ w).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ layer.experts.w_out[2]
    assert torch.allclose(layer.experts.expert(2, x), expected)


def test_routing_can_be_overridden_at_call_time_without_touching_weights():
    layer = make_layer()
    before = weights_hash(layer)
    x = torch.randn(40, 16)
    _, r2 = layer(x)
    _, r4 = layer(x, top_k=4)
    _, rs = layer(x, scheme="switch", capacity_factor=0.5)
    assert r2.indices.shape[1] == 2 and r4.indices.shape[1] == 4
    assert rs.scheme == "switch" and rs.capacity == 4 and rs.dropped.any()
    assert weights_hash(layer) == before


def test_dropped_tokens_get_no_expert_output_only_the_shared_one():
    layer = make_layer("switch", n_shared=1)
    x = torch.randn(30, 16)
    y, r = layer(x, capacity=1)
    lost = ~r.dispatch.any(1)
    assert lost.any()
    assert torch.allclose(y[lost], layer.shared(x[lost]), atol=1e-6)


def test_group_size_routes_each_group_separately():
    layer = make_layer("expert_choice", group_size=10)
    _, r = layer(torch.randn(30, 16))
    assert r.capacity == 2 and int(r.load.sum()) == 3 * 6 * 2  # 3 groups x 6 experts x ceil(10/6)


def test_gradients_reach_router_and_the_chosen_experts_only():
    layer = make_layer()
    x = torch.randn(8, 16)
    y, r = layer(x)
    y.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    unused = ~r.dispatch.any(0)
    if unused.any():
        assert (layer.experts.w_in.grad[unused] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_in_another_float_precision_is_cast_to_the_layers_dtype_and_back(dtype):
    # the documented choice (MoELayer's docstring): computed in the layer's dtype, returned in the input's
    layer = make_layer(n_shared=1)
    x = torch.randn(3, 7, 16).to(dtype).requires_grad_()
    y, r = layer(x)
    y_ref, r_ref = layer(x.detach().float())
    assert y.dtype == dtype and torch.equal(r.indices, r_ref.indices)
    torch.testing.assert_close(y, y_ref.to(dtype))
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and layer.router.weight.grad is not None


def test_bad_layer_settings():
    with pytest.raises(ValueError, match="at least 1"):
        MoELayer(16, 24, 0, 1)
    with pytest.raises(ValueError, match="between 1 and N"):
        MoELayer(16, 24, 4, 5)
    with pytest.raises(ValueError, match="unknown routing scheme"):
        MoELayer(16, 24, 4, 2, scheme="nope")
    layer = make_layer()
    with pytest.raises(ValueError, match="expects"):
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match="between 1 and N"):
        layer(torch.randn(4, 16), top_k=7)
    with pytest.raises(ValueError, match="has no capacity"):
        layer(torch.randn(4, 16), capacity_factor=1.0)
    with pytest.raises(ValueError, match="does not take"):
        layer(torch.randn(4, 16), n_groups=2)
    with pytest.raises(ValueError, match="floating-point input"):
        layer(torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="group_size"):
        MoELayer(16, 24, 4, 2, group_size=0)
    with pytest.raises(ValueError, match="normalize must be True or False"):   # checked when built, not at the first call
        MoELayer(16, 24, 4, 2, normalize="yes")


def test_dense_ffn_and_device_choice():
    ffn = DenseFFN(8, 12)
    assert ffn(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    layer = make_layer()
    x = torch.randn(64, 16)
    y_cpu, _ = layer(x)
    y_gpu, _ = layer.to("cuda")(x.cuda())
    assert torch.allclose(y_cpu, y_gpu.cpu(), atol=1e-4)
    y_bf16, _ = layer.to(torch.bfloat16)(x.cuda().bfloat16())  # grouped GEMM path
    assert torch.allclose(y_cpu, y_bf16.float().cpu(), atol=5e-2)


def test_the_package_exports_the_layer_and_routing_api_without_importing_torch_up_front():
    # `moe_core.MoELayer(...)` is the documented entry point; names load on first use so that
    # `import moe_core` alone (the CLI's argument parsing) stays free of torch
    import subprocess
    import sys

    code = ("import sys, moe_core; assert 'torch' not in sys.modules, 'import moe_core pulled in torch'; "
            "import torch; from moe_core import MoELayer; y, r = MoELayer(16, 32, 4, 2)(torch.randn(3, 16)); "
            "print(tuple(y.shape), tuple(r.indices.shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(3,", "16)", "(3,", "2)"]

    import importlib

    import moe_core

    for name in moe_core.__all__:
        source = importlib.import_module(f"moe_core.{moe_core._EXPORTS[name]}")
        assert getattr(moe_core, name) is getattr(source, name)
    assert set(moe_core.SCHEMES) >= {"softmax_topk", "noisy_topk", "switch", "gshard", "expert_choice", "base", "deepseek"}
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        moe_core.NotAThing


def _mixtral_like_layer():
    torch.manual_seed(3)
    layer = MoELayer(32, 48, 6, 2).eval()
    with torch.no_grad():                        # larger weights than the init, so outputs are far from 0
        layer.experts.w_in.normal_(0, 0.3)
        layer.experts.w_out.normal_(0, 0.3)
    return layer, torch.randn(40, 32)


def test_bench_hf_baseline_fallback_holds_our_weights_and_computes_our_layer(monkeypatch):
    # `moe-lab bench` times our layer against an HF Mixtral-style loop holding the same weights:
    # the comparison is only fair if both compute the same thing
    import sys

    from moe_core.perf.bench import hf_baseline

    monkeypatch.setitem(sys.modules, "transformers", None)     # as where transformers is not installed
    layer, x = _mixtral_like_layer()
    hf, label = hf_baseline(layer)
    assert "transcription" in label
    with torch.no_grad():
        ours = layer(x)[0]
        assert ours.abs().mean() > 1e-2
        torch.testing.assert_close(hf(x), ours, rtol=1e-5, atol=1e-6)


def test_transformers_mixtral_block_holding_our_weights_computes_our_layer():
    transformers = pytest.importorskip("transformers")       # the `bench` extra; `make test` installs it
    from moe_core.perf.bench import hf_baseline

    layer, x = _mixtral_like_layer()
    hf, label = hf_baseline(layer)
    assert label.startswith(f"transformers {transformers.__version__} MixtralSparseMoeBlock")
    with torch.no_grad():
        torch.testing.assert_close(hf(x), layer(x)[0], rtol=1e-5, atol=1e-6)
        # and a second routing of the same text: top-1 only, with the block told k = 1 too
        layer.top_k = 1
        hf1, _ = hf_baseline(layer)
        torch.testing.assert_close(hf1(x), layer(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{"scheme": "switch"}, {"n_shared": 1}, {"activation": "gelu"}, {"normalize": False}])
def test_bench_hf_baseline_refuses_a_layer_that_is_not_mixtral_like(kw):
    from moe_core.perf.bench import hf_baseline

    with pytest.raises(ValueError, match="HF Mixtral baseline"):
        hf_baseline(MoELayer(16, 24, 4, 2, **kw))
