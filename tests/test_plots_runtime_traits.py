"""Fast, offline tests of utils.plots, utils.runtime and utils.traits."""

from __future__ import annotations

import pickle
import re
import threading

import plotly.graph_objects as go
import pytest
import torch

from utils import plots, runtime
from utils.data import load_traits
from utils.models import GEMMA2_27B
from utils.runtime import StageTimer, run_parallel
from utils.traits import TRAITS_SUBSET, load_precomputed_trait_vectors

NAMES = [f"persona_{i}" for i in range(21)]


# --- runtime -------------------------------------------------------------------------------------

class _FakeClock:
    """Stands in for ``time.perf_counter`` in utils.runtime: it moves only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setattr(runtime, "time", fake)  # utils.runtime's own `time`, not the time module everyone shares
    return fake


def test_stage_timer_accumulates_in_order(clock):
    timer = StageTimer()
    with timer("b"):
        clock.advance(0.26)
    with timer("a"):
        pass
    clock.advance(5.0)  # between stages: not counted
    with timer("b"):
        clock.advance(0.5)
    seconds = timer.seconds()
    assert list(seconds) == ["b", "a", "total"]
    assert seconds == {"b": 0.8, "a": 0.0, "total": 0.8}  # accumulated, then rounded to 0.1 s
    assert repr(timer) == "StageTimer({'b': 0.8, 'a': 0.0, 'total': 0.8})"


def test_stage_timer_total_is_the_rounded_sum_of_the_unrounded_stages(clock):
    timer = StageTimer()
    for stage in ("x", "y", "z"):
        with timer(stage):
            clock.advance(0.04)
    assert timer.seconds() == {"x": 0.0, "y": 0.0, "z": 0.0, "total": 0.1}


def test_stage_timer_counts_a_raising_block(clock):
    timer = StageTimer()
    with pytest.raises(RuntimeError), timer("boom"):
        clock.advance(1.5)
        raise RuntimeError
    assert timer.seconds() == {"boom": 1.5, "total": 1.5}


def test_run_parallel_records_every_item():
    items = [(p, q) for p in "abc" for q in range(5)]

    def fn(key):
        if key[1] == 3:
            raise ValueError(f"bad {key}")
        return f"{key[0]}{key[1]}"

    results, failures = run_parallel(fn, items, max_workers=4, progress=False)
    assert set(results) | set(failures) == set(items)
    assert not set(results) & set(failures)
    assert results[("a", 0)] == "a0"
    assert failures[("b", 3)] == "ValueError: bad ('b', 3)"
    assert len(failures) == 3


def test_run_parallel_runs_concurrently_and_handles_edge_cases():
    barrier = threading.Barrier(4, timeout=5)  # only passes if 4 calls run at the same time

    def wait_then_return(i):
        barrier.wait()
        return i

    results, failures = run_parallel(wait_then_return, range(4), max_workers=4, progress=False)
    assert failures == {} and results == {0: 0, 1: 1, 2: 2, 3: 3}
    assert run_parallel(lambda x: x, [], progress=False) == ({}, {})
    with pytest.raises(ValueError, match="distinct"):
        run_parallel(lambda x: x, [1, 2, 1], progress=False)


# --- plots ---------------------------------------------------------------------------------------

def _assert_readable(fig: go.Figure):
    assert isinstance(fig, go.Figure)
    assert fig.layout.title.text
    assert fig.layout.xaxis.title.text
    assert all(trace.hovertemplate for trace in fig.data)


def test_score_distribution():
    roles = ["analyst", "ghost", "bard"]
    scores = {(r, q): (i + q) % 4 for i, r in enumerate(roles) for q in range(6)}
    scores[("jester", 0)] = 3  # not in roles_in_order: still shown
    fig = plots.score_distribution(scores, roles_in_order=roles)
    _assert_readable(fig)
    assert fig.layout.barmode == "stack" and len(fig.data) == 4
    assert list(fig.data[0].x) == roles + ["jester"]
    assert sum(sum(trace.y) for trace in fig.data) == len(scores)
    with pytest.raises(ValueError):
        plots.score_distribution({("ghost", 0): 7}, ["ghost"])


def test_similarity_heatmap():
    v = torch.randn(21, 16)
    v = v / v.norm(dim=1, keepdim=True)
    fig = plots.similarity_heatmap(v @ v.T, NAMES, title="cosine")
    _assert_readable(fig)
    heat = fig.data[0]
    assert heat.zmid == 0 and list(heat.x) == NAMES and list(heat.y) == NAMES
    assert "%{z" in heat.hovertemplate
    with pytest.raises(ValueError):
        plots.similarity_heatmap(torch.zeros(3, 3), NAMES, title="wrong size")


@pytest.mark.parametrize("k", [1, 2, 5])
def test_pca_scatter(k):
    proj, explained, colour = torch.randn(21, k), torch.linspace(0.5, 0.1, k), torch.randn(21)
    fig = plots.pca_scatter(proj, explained, NAMES, color=colour, color_label="axis projection", title="PCA")
    _assert_readable(fig)
    scatter = fig.data[0]
    assert list(scatter.text) == NAMES
    assert scatter.marker.colorbar.title.text == "axis projection"
    assert "50.0%" in fig.layout.xaxis.title.text
    assert list(scatter.y) == ([0.0] * 21 if k == 1 else proj[:, 1].double().tolist())


def test_axis_strip():
    projections = {n: float(x) for n, x in zip(NAMES, torch.randn(21))}
    defaults = NAMES[:5]
    fig = plots.axis_strip(projections, defaults=defaults, title="axis")
    _assert_readable(fig)
    default_trace, role_trace = fig.data
    assert set(default_trace.text) == set(defaults) and len(role_trace.text) == 16
    assert default_trace.marker.symbol != role_trace.marker.symbol
    assert default_trace.marker.color != role_trace.marker.color
    assert len(fig.layout.annotations) == 21
    assert len({a.ay for a in fig.layout.annotations}) > 2  # staggered labels


def test_trait_bars_shows_top_and_bottom():
    ranking = sorted(((f"trait_{i}", float(x)) for i, x in enumerate(torch.linspace(-1, 1, 30))),
                     key=lambda kv: -kv[1])
    fig = plots.trait_bars(ranking, title="traits", top=5)
    _assert_readable(fig)
    shown = list(fig.data[0].y)
    assert shown == [t for t, _ in ranking[:5]] + [t for t, _ in ranking[-5:]]
    assert "30" in fig.layout.title.text
    assert len(plots.trait_bars(ranking[:8], title="few", top=5).data[0].y) == 8


def test_control_bars():
    results = {"residual stream, with system prompt (main result)": {"auc": 0.9, "corr_with_main": 1.0},
               "token embeddings only": {"auc": 0.7, "corr_with_main": -0.2}}
    fig = plots.control_bars(results, title="controls")
    _assert_readable(fig)
    assert fig.layout.barmode == "group" and [t.y for t in fig.data] == [(0.9, 0.7), (1.0, -0.2)]
    assert tuple(fig.layout.yaxis.range)[0] == -1
    chance = [s for s in fig.layout.shapes if s.y0 == 0.5 and s.y1 == 0.5]
    assert chance and chance[0].line.dash == "dash"
    positive = {k: {"auc": 0.6, "corr_with_main": 0.5} for k in results}
    assert tuple(plots.control_bars(positive, title="c").layout.yaxis.range)[0] == 0


def test_save_writes_offline_html(tmp_path):
    fig = plots.similarity_heatmap(torch.eye(3), ["alpha_persona", "b", "c"], title="Saved heatmap")
    path = plots.save(fig, tmp_path / "nested" / "dir" / "fig.html")
    html = path.read_text()
    assert "alpha_persona" in html and "Saved heatmap" in html
    # plotly.js is loaded from a file beside the figure, never from a CDN
    sources = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html)
    assert sources == ["plotly.min.js"]
    assert (path.parent / "plotly.min.js").stat().st_size > 1_000_000


# --- traits --------------------------------------------------------------------------------------

def test_traits_subset_exists_and_spans_both_ends():
    all_traits = load_traits()
    assert 10 <= len(TRAITS_SUBSET) <= 14 and len(set(TRAITS_SUBSET)) == len(TRAITS_SUBSET)
    assert [t for t in TRAITS_SUBSET if t not in all_traits] == []
    assistant_end = {"transparent", "grounded", "analytical", "methodical", "cautious", "calm"}
    assert assistant_end & set(TRAITS_SUBSET[:6]) and set(TRAITS_SUBSET[:6]) - assistant_end


def test_no_precomputed_vectors_for_other_models(monkeypatch):
    import huggingface_hub

    def fail(**kwargs):
        raise AssertionError("must not touch the hub for a model without precomputed vectors")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    vectors, source = load_precomputed_trait_vectors("smollm2-135m-instruct", 15)
    assert vectors is None and "no precomputed vectors for smollm2-135m-instruct" in source


def test_hub_unreachable_falls_back_with_a_reason(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    vectors, source = load_precomputed_trait_vectors(GEMMA2_27B, 22)
    assert vectors is None
    assert source.startswith("could not reach the Hugging Face hub (ConnectionError)")


def test_hub_download_loads_layer_row_with_weights_only(monkeypatch, tmp_path):
    import huggingface_hub

    stacked = torch.arange(24, dtype=torch.bfloat16).reshape(3, 8)  # [n_layers, d_model]
    calls = []

    def download(repo_id, repo_type, filename):
        calls.append((repo_id, repo_type, filename))
        path = tmp_path / filename.replace("/", "_")
        torch.save(stacked, path)
        return str(path)

    loads = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(torch, "load", spy_load)
    vectors, source = load_precomputed_trait_vectors(GEMMA2_27B, 1, traits=["calm", "chaotic"])
    assert source.startswith("precomputed by the paper (Hugging Face")
    assert calls[0] == ("lu-christina/assistant-axis-vectors", "dataset", "gemma-2-27b/trait_vectors/calm.pt")
    assert set(vectors) == {"calm", "chaotic"}
    assert vectors["calm"].dtype == torch.float32 and torch.equal(vectors["calm"], stacked[1].float())
    assert loads and all(kw.get("weights_only") is True for kw in loads)
    with pytest.raises(ValueError, match="out of range"):
        load_precomputed_trait_vectors(GEMMA2_27B, 5, traits=["calm"])


class _Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_or_corrupt_file_is_rejected_not_swallowed(monkeypatch, tmp_path):
    import huggingface_hub

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"v": _Payload()}, unsafe)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: str(unsafe))
    with pytest.raises(pickle.UnpicklingError):
        load_precomputed_trait_vectors(GEMMA2_27B, 0, traits=["calm"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: str(corrupt))
    with pytest.raises(pickle.UnpicklingError):  # raised, not turned into a "could not reach the hub" fallback
        load_precomputed_trait_vectors(GEMMA2_27B, 0, traits=["calm"])
