"""Steering and capping hooks: the exact formula, hook hygiene, both block-output forms, bf16, positions."""

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from utils.models import cap_layer_range
from utils.steering import CapStats, ProjectionProbe, cap_activations, capping, capping_thresholds, intervene, steering

PROMPT = [[2, 106, 50, 60, 70, 80, 90, 107], [2, 106, 51, 61, 71, 81, 91, 107]]


def _ids():
    return torch.tensor(PROMPT)


def _unit(v):
    return v / v.norm()


def _axes(d_model, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(d_model, generator=g) for layer in layers}


def _hook_counts(model):
    return ([len(b._forward_hooks) for b in model.model.layers], len(model.model._forward_pre_hooks))


def _block_projections(model, ids, axes):
    """Projection of each block output on its unit axis, from a plain forward pass: {layer: [batch, seq]}."""
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return {layer: hs[layer + 1].float() @ _unit(a) for layer, a in axes.items()}


# ---------------------------------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------------------------------

def test_cap_activations_is_exact_in_float32():
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16) * 4
    a = _unit(torch.randn(16))
    proj = h @ a
    tau = float(proj.median())
    out = cap_activations(h, a, tau)
    above = proj >= tau
    assert above.any() and (~above).any()
    assert torch.equal(out[above], h[above])  # bit for bit, not h + 0 * a
    torch.testing.assert_close(out[~above] @ a, torch.full(((~above).sum(),), tau), atol=1e-5, rtol=0)
    # only the component along a moves
    orth = lambda x: x - (x @ a).unsqueeze(-1) * a  # noqa: E731
    torch.testing.assert_close(orth(out), orth(h), atol=1e-5, rtol=0)
    reference = h + torch.clamp(tau - proj, min=0).unsqueeze(-1) * a
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_cap_activations_bf16_keeps_dtype_and_untouched_bits():
    torch.manual_seed(1)
    h = (torch.randn(5, 9, 32) * 8).to(torch.bfloat16)
    a = _unit(torch.randn(32))
    proj = h.float() @ a
    tau = float(proj.quantile(0.4))
    out = cap_activations(h, a, tau)
    assert out.dtype == torch.bfloat16
    above = proj >= tau
    assert torch.equal(out[above], h[above])
    lifted = out[~above].float() @ a
    # bf16 rounding of a [32] vector of size ~45 moves its projection by well under 1
    assert (lifted - tau).abs().max() < 0.5 and (lifted > proj[~above]).all()


def test_cap_activations_rejects_bad_inputs():
    h, a = torch.randn(4, 8), _unit(torch.randn(8))
    with pytest.raises(ValueError, match="norm"):
        cap_activations(h, a * 3, 0.0)
    with pytest.raises(ValueError, match="Shapes"):
        cap_activations(h, _unit(torch.randn(7)), 0.0)
    with pytest.raises(ValueError, match="finite"):
        cap_activations(h, a, float("nan"))


# ---------------------------------------------------------------------------------------------------
# Against hand-written hooks on the real (tiny) model
# ---------------------------------------------------------------------------------------------------

def _manual_hooks(model, fn_per_layer):
    handles = []
    for layer, fn in fn_per_layer.items():
        def hook(module, args, output, fn=fn):
            h = output[0] if isinstance(output, tuple) else output
            new = fn(h)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        handles.append(model.model.layers[layer].register_forward_hook(hook))
    return handles


def _manual_cap(a, tau):
    a = _unit(a.float())

    def fn(h):
        hf = h.float()
        return (hf + torch.clamp(tau - hf @ a, min=0).unsqueeze(-1) * a).to(h.dtype)
    return fn


def test_capping_equals_a_hand_written_hook(tiny):
    model, _ = tiny
    axes = _axes(64, [2, 4])
    taus = {layer: float(p.quantile(0.6)) for layer, p in _block_projections(model, _ids(), axes).items()}
    with torch.inference_mode():
        plain = model(input_ids=_ids()).logits
        stats = CapStats()
        with capping(model, axes, taus, stats=stats):
            ours = model(input_ids=_ids()).logits
        handles = _manual_hooks(model, {layer: _manual_cap(axes[layer], taus[layer]) for layer in axes})
        try:
            manual = model(input_ids=_ids()).logits
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the cap did something
    assert stats.seen(2) == stats.seen(4) == 16 and 0 < stats.fraction_capped() < 1
    assert set(stats.per_layer()) == {2, 4}


def test_steering_and_add_then_cap_equal_hand_written_hooks(tiny):
    model, _ = tiny
    vec = _axes(64, [3], seed=5)[3] * 3
    axis = _axes(64, [3], seed=6)[3]
    with torch.inference_mode():
        with steering(model, {3: vec}):
            ours = model(input_ids=_ids()).logits
        handles = _manual_hooks(model, {3: lambda h: h + vec})
        try:
            manual = model(input_ids=_ids()).logits
        finally:
            handles[0].remove()
        assert torch.equal(ours, manual)

        cap = _manual_cap(axis, 1.0)
        with intervene(model, add={3: vec}, cap={3: (axis, 1.0)}):
            ours = model(input_ids=_ids()).logits
        handles = _manual_hooks(model, {3: lambda h: cap(h + vec)})  # add first, then cap
        try:
            manual = model(input_ids=_ids()).logits
        finally:
            handles[0].remove()
        handles = _manual_hooks(model, {3: lambda h: cap(h) + vec})  # the wrong order
        try:
            wrong_order = model(input_ids=_ids()).logits
        finally:
            handles[0].remove()
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, wrong_order, atol=1e-3)


def test_bf16_model(tiny):
    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    axes = _axes(64, [2])
    proj = _block_projections(model, _ids(), axes)[2]
    tau = float(proj.quantile(0.5))
    with torch.inference_mode(), capping(model, axes, {2: tau}), ProjectionProbe(model, axes) as probe:
        out = model(input_ids=_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    seen = probe.cat(2)
    assert seen.dtype == torch.float32
    above = proj >= tau
    assert torch.equal(seen[above], proj[above])  # untouched positions, same bits
    assert (seen[~above] - tau).abs().max() < 0.5  # lifted to tau up to bf16 rounding


# ---------------------------------------------------------------------------------------------------
# Hook hygiene and both block-output forms
# ---------------------------------------------------------------------------------------------------

def test_hooks_removed_on_exit_and_on_exception(tiny):
    model, _ = tiny
    before = _hook_counts(model)
    axes = _axes(64, [1, 4])
    with capping(model, axes, {1: 0.0, 4: 0.0}, positions="generated", stats=CapStats()), \
            ProjectionProbe(model, axes):
        assert _hook_counts(model) != before
    assert _hook_counts(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, {1: axes[1]}), ProjectionProbe(model, axes):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before
    with pytest.raises(ValueError):  # a failure while registering leaves nothing behind either
        with intervene(model, add={1: axes[1]}, cap={99: (axes[4], 0.0)}):
            pass
    assert _hook_counts(model) == before


class _Block(nn.Module):
    """A toy decoder block returning a tuple (transformers 4.x style) or a tensor (5.x style)."""

    def __init__(self, d, as_tuple):
        super().__init__()
        self.lin, self.as_tuple = nn.Linear(d, d), as_tuple

    def forward(self, x):
        y = self.lin(x)
        return (y, "cache-entry") if self.as_tuple else y


class _Inner(nn.Module):
    def __init__(self, d, as_tuple):
        super().__init__()
        self.layers = nn.ModuleList([_Block(d, as_tuple) for _ in range(2)])

    def forward(self, x, attention_mask=None, use_cache=None):
        outs = []
        for layer in self.layers:
            out = layer(x)
            outs.append(out)
            x = out[0] if isinstance(out, tuple) else out
        return outs


class _Toy(nn.Module):
    def __init__(self, d, as_tuple):
        super().__init__()
        self.model, self.config = _Inner(d, as_tuple), SimpleNamespace(hidden_size=d)


@pytest.mark.parametrize("as_tuple", [True, False])
def test_tuple_and_tensor_block_outputs(as_tuple):
    torch.manual_seed(0)
    toy = _Toy(8, as_tuple)
    x = torch.randn(2, 5, 8)
    a = _unit(torch.randn(8))
    with torch.no_grad():
        plain = toy.model(x)
        h1 = plain[1][0] if as_tuple else plain[1]
        tau = float((h1 @ a).median())
        stats = CapStats()
        with capping(toy, {1: a}, {1: tau}, stats=stats):
            capped = toy.model(x, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert isinstance(capped[1], tuple) == as_tuple
    if as_tuple:
        assert capped[1][1] == "cache-entry"  # the rest of the tuple is passed through
    c1 = capped[1][0] if as_tuple else capped[1]
    torch.testing.assert_close(c1, cap_activations(h1, a, tau))
    assert stats.seen(1) == 9  # the padding position is not counted
    expected = ((h1 @ a < tau) & torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()).sum()
    assert stats.capped(1) == int(expected)


# ---------------------------------------------------------------------------------------------------
# positions="generated"
# ---------------------------------------------------------------------------------------------------

def _generate(model, n_new):
    ids = _ids()
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False)


def test_generated_positions_touch_only_decode_passes(tiny):
    model, _ = tiny
    axes = _axes(64, [3])
    huge = 1e4  # every position is below this floor: all changed positions are visible
    with torch.inference_mode():
        plain = _generate(model, 4)
        with ProjectionProbe(model, axes) as plain_probe:
            _generate(model, 4)
        stats = CapStats()
        with capping(model, axes, {3: huge}, positions="generated", stats=stats), \
                ProjectionProbe(model, axes) as probe:
            capped = _generate(model, 4)
    passes = probe.projections[3]
    assert [tuple(p.shape) for p in passes] == [(2, 8), (2, 1), (2, 1), (2, 1)]
    assert torch.equal(passes[0], plain_probe.projections[3][0])  # the prompt's prefill pass is untouched
    for p in passes[1:]:
        torch.testing.assert_close(p, torch.full_like(p, huge))  # every decode pass is capped
    assert torch.equal(capped[:, :9], plain[:, :9])  # the first new token comes from the unchanged prefill
    assert stats.seen(3) == 2 * 3 and stats.fraction_capped(3) == 1.0

    # "all" changes the prefill too
    with torch.inference_mode(), capping(model, axes, {3: huge}), ProjectionProbe(model, axes) as probe_all:
        _generate(model, 2)
    torch.testing.assert_close(probe_all.projections[3][0], torch.full((2, 8), huge))

    # a plain forward pass is not a generated pass
    with torch.inference_mode(), steering(model, {3: axes[3] * 100}, positions="generated"):
        same = model(input_ids=_ids()).logits
    assert torch.equal(same, model(input_ids=_ids()).logits)


def test_generated_positions_need_a_kv_cache(tiny):
    model, _ = tiny
    ids = _ids()
    with pytest.raises(ValueError, match="use_cache=False"):
        with torch.inference_mode(), steering(model, {3: torch.ones(64)}, positions="generated"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           use_cache=False)


# ---------------------------------------------------------------------------------------------------
# Probes and hook order
# ---------------------------------------------------------------------------------------------------

def test_probe_registered_after_reads_capped_values_and_before_reads_raw(tiny):
    model, _ = tiny
    axes = _axes(64, [2])
    raw = _block_projections(model, _ids(), axes)[2]
    tau = float(raw.quantile(0.5))
    with torch.inference_mode():
        with capping(model, axes, {2: tau}), ProjectionProbe(model, axes) as after:
            model(input_ids=_ids())
        with ProjectionProbe(model, axes) as before:
            with pytest.warns(UserWarning, match="BEFORE this intervention"), capping(model, axes, {2: tau}):
                model(input_ids=_ids())
    torch.testing.assert_close(after.cat(2), torch.clamp(raw, min=tau), atol=1e-4, rtol=0)
    torch.testing.assert_close(before.cat(2), raw, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no probe active any more: no warning
        with capping(model, axes, {2: tau}):
            pass


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(add={6: torch.ones(64)}), "out of range.*0..5"),
    (dict(add={-1: torch.ones(64)}), "out of range"),
    (dict(add={2: torch.ones(63)}), r"shape \(63,\).*\[64\]"),
    (dict(add={2: torch.ones(6, 64)}), "one layer's row"),
    (dict(add={2: torch.full((64,), float("nan"))}), "NaN"),
    (dict(cap={2: (torch.zeros(64), 0.0)}), "all zeros"),
    (dict(cap={2: (torch.ones(64), float("inf"))}), "finite"),
    (dict(cap={2: torch.ones(64)}), "pair"),
    (dict(add={2: torch.ones(64)}, positions="sideways"), "positions must be one of"),
    (dict(), "nothing to do"),
    (dict(add={2: torch.ones(64)}, stats=CapStats()), "no layer is capped"),
])
def test_intervene_rejects_bad_input(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        with intervene(tiny[0], **kwargs):
            pass


def test_capping_needs_the_same_layers(tiny):
    with pytest.raises(ValueError, match="same layers.*4"):
        with capping(tiny[0], {2: torch.ones(64), 4: torch.ones(64)}, {2: 0.0}):
            pass


def test_cap_stats_before_use():
    with pytest.raises(ValueError, match="no positions"):
        CapStats().fraction_capped()


# ---------------------------------------------------------------------------------------------------
# Thresholds and layer ranges
# ---------------------------------------------------------------------------------------------------

def test_capping_thresholds_are_percentiles():
    torch.manual_seed(0)
    proj = {3: torch.randn(37), 5: torch.randn(12) + 4}
    got = capping_thresholds(proj)
    for layer, values in proj.items():
        assert got[layer] == pytest.approx(float(np.percentile(values.numpy(), 25)), abs=1e-5)
    # 37 values: the 50th percentile is the middle one
    assert capping_thresholds(proj, 50.0)[3] == pytest.approx(float(proj[3].median()), abs=1e-5)
    assert capping_thresholds(proj, 90.0)[5] > got[5]
    for bad in (0, 100, -5, 250, float("nan")):
        with pytest.raises(ValueError, match="percentile"):
            capping_thresholds(proj, bad)
    with pytest.raises(ValueError, match="empty"):
        capping_thresholds({})
    with pytest.raises(ValueError, match=r"projections\[3\] is empty"):
        capping_thresholds({3: torch.zeros(0)})


def test_cap_layer_range():
    assert cap_layer_range(80) == list(range(56, 72))  # the paper's Llama 3.3 70B config
    assert cap_layer_range(30) == list(range(21, 27))  # SmolLM2
    assert cap_layer_range(6) == [4]  # tiny-gemma2
    assert cap_layer_range(64, 46 / 64, 54 / 64) == list(range(46, 54))  # the paper's Qwen 3 32B config
    assert cap_layer_range(1) == [0]
    with pytest.raises(ValueError):
        cap_layer_range(0)
    with pytest.raises(ValueError):
        cap_layer_range(30, 0.9, 0.7)


def test_capping_benchmark_runs_at_tiny_size(capsys):
    import json

    from benchmarks import capping as bench

    assert bench.main(["--model", "tiny-gemma2", "--prompts", "2", "--new-tokens", "3", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["capping_overhead_ratio"] > 0 and result["layers"] == [4] and 0 < result["fraction_capped"] < 1  # capping acts on generation


def test_gpu_part2_script_runs_at_tiny_size(capsys):
    """benchmarks/gpu_part2.py, the GPU check of Part 2's path at Gemma 2 27B's shape, on the CPU at tiny size:
    per-turn projections in a window, capped and steered generation, the KL cost; every capped position at or
    above its threshold when read after the capping hooks, and no hook left behind."""
    import json

    from benchmarks import gpu_part2

    assert gpu_part2.main(["--shape", "tiny", "--turns", "2", "--prompts", "3", "--new-tokens", "4",
                           "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and result["hooks_left"] == 0 and result["worst_shortfall"] <= 1e-5
    assert result["drift"]["turns"] == 2 and result["drift"]["finite"]
    assert 0 < result["fraction_capped"] < 1 and result["capping_overhead_ratio"] > 0 and result["kl_positions"] > 0


def test_gpu_part2_script_refuses_the_full_shape_without_a_gpu(monkeypatch):
    from benchmarks import gpu_part2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_part2.main([])


def test_interventions_act_on_generation_of_the_one_model(tiny):
    """The model that is read is the model that writes: a `with capping(model, ...)` or `with steering(model,
    ...)` changes what `generate(model, ...)` writes, in float32 and in bf16, and its hooks are gone afterwards."""
    from utils.generation import generate

    model32, tok = tiny
    for model in (model32, copy.deepcopy(model32).to(torch.bfloat16)):
        before = _hook_counts(model)
        convs = [[{"role": "user", "content": "Tell me about the sea."}]]
        plain = generate(model, tok, convs, 8, temperature=0.0)
        vector = 200.0 * _unit(_axes(64, [2], seed=3)[2])
        with steering(model, {2: vector}):
            steered = generate(model, tok, convs, 8, temperature=0.0)
        assert steered != plain
        stats = CapStats()
        axes = _axes(64, [3, 4], seed=5)
        with capping(model, axes, {3: 1e4, 4: 1e4}, stats=stats):  # a floor far above every activation
            generate(model, tok, convs, 4, temperature=0.0)
        assert stats.fraction_capped() == 1.0, "every generated position was capped"
        assert _hook_counts(model) == before
