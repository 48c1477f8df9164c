"""The notebooks' figures (plotly). Each function returns a ``plotly.graph_objects.Figure``.

``save(fig, path)`` writes a standalone HTML file with plotly.js inlined, so it opens offline.
All figures have a title, axis titles and hover text, and stay readable with ~20 personas.

Nothing that explains a figure sits at its right edge: legends are above the plot at the left, one entry a
line (:data:`TOP_LEGEND`), colour bars are horizontal and start at the left, and no figure has a second y
axis on the right. JupyterLab keeps each figure of a saved notebook as a static image as wide as the window
it was drawn in, and shows that image when the notebook is reopened (the interactive figure comes back when
the mouse is over it): in a narrower window the image's right edge is cut off, so the legends, colour bars
and axes stay readable and only the right end of the data is hidden until the mouse is over the figure.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
import torch
from jaxtyping import Float
from torch import Tensor

TEMPLATE = "plotly_white"
DIVERGING = "RdBu_r"  # red = positive, blue = negative, white = 0
SCORE_COLOURS = {0: "#b2182b", 1: "#ef8a62", 2: "#67a9cf", 3: "#2166ac"}
SCORE_MEANINGS = {
    0: "0: itself, refuses",
    1: "1: itself, answers",
    2: "2: itself, some of the role",
    3: "3: fully plays the role",
}
DEFAULT_COLOUR, ROLE_COLOUR = "#d95f02", "#1b9e77"
# The legend above the plot, at the left, one entry a line (see the module docstring: a horizontal legend
# runs across the whole width, and its last entries are what a narrower window cuts off).
TOP_LEGEND = dict(orientation="v", yanchor="bottom", y=1.02, x=0, xanchor="left")


def _legend_on_top(fig: go.Figure, title: str | None = None) -> go.Figure:
    """Put the legend (:data:`TOP_LEGEND`, titled ``title``) above the plot, the figure's title above it, and
    make the top margin (and the figure, by as much) as tall as both need."""
    lines = sum(t.showlegend is not False for t in fig.data) + (title is not None)
    fig.update_layout(legend=dict(**TOP_LEGEND, title=dict(text=title) if title else None),
                      title=dict(yref="container", y=1, yanchor="top", pad=dict(t=16)),
                      margin=dict(t=64 + 20 * lines), height=(fig.layout.height or 450) + 20 * lines)
    return fig


def _bottom_colorbar(title: str) -> dict:
    """A horizontal colour bar under the plot (not at the right edge)."""
    return dict(title=dict(text=title, side="top"), orientation="h", x=0, xanchor="left", y=-0.32, yanchor="top",
                len=0.6, thickness=14)


def _floats(values, name: str) -> list[float]:
    """A 1-D tensor / array / sequence as a list of Python floats."""
    t = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.tolist()


def _wrap(label: str, width: int = 22) -> str:
    """Break a long label into lines for an axis tick (plotly uses ``<br>``)."""
    return "<br>".join(textwrap.wrap(label, width)) or label


def save(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` as an HTML file that works offline; return the path.

    plotly.js is written once as ``plotly.min.js`` beside the figures (``include_plotlyjs="directory"``),
    so a folder of figures costs one copy of the library, not one per figure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs="directory", full_html=True)
    return path


def score_distribution(scores: Mapping[tuple[str, int], int], roles_in_order: Sequence[str]) -> go.Figure:
    """Stacked bars: for each role, how many of its responses the judge scored 0, 1, 2 and 3.

    Args:
        scores: ``(role, question_index) -> score`` in 0..3.
        roles_in_order: the roles' order on the x axis. Roles that have scores but are not listed are
            appended (sorted), so no score is hidden.
    """
    counts: dict[str, dict[int, int]] = {}
    for key, score in scores.items():
        role = key[0]
        if score not in SCORE_COLOURS:
            raise ValueError(f"Score {score!r} for {key} is outside the 0-3 scale.")
        counts.setdefault(role, dict.fromkeys(SCORE_COLOURS, 0))[score] += 1
    roles = list(dict.fromkeys(roles_in_order))
    roles += sorted(r for r in counts if r not in roles)
    totals = [sum(counts.get(r, {}).values()) for r in roles]

    fig = go.Figure()
    for score, colour in SCORE_COLOURS.items():
        ys = [counts.get(r, {}).get(score, 0) for r in roles]
        pct = [100 * y / t if t else 0.0 for y, t in zip(ys, totals)]
        fig.add_trace(go.Bar(
            x=roles, y=ys, name=SCORE_MEANINGS[score], marker_color=colour,
            customdata=list(zip(pct, totals)),
            hovertemplate=(f"<b>%{{x}}</b><br>score {score}: %{{y}} of %{{customdata[1]}} responses "
                           f"(%{{customdata[0]:.0f}}%)<extra></extra>"),
        ))
    fig.update_layout(
        template=TEMPLATE, barmode="stack",
        title=f"Judge scores per role ({sum(totals)} judged responses)",
        xaxis=dict(title="role", tickangle=-45), yaxis=dict(title="number of responses"),
        height=560,
    )
    return _legend_on_top(fig, "judge score")


def similarity_heatmap(matrix: Float[Tensor, "n n"], names: Sequence[str], title: str) -> go.Figure:
    """Heatmap of an ``[n, n]`` similarity matrix, diverging colours centred at 0, names on both axes."""
    m = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
    n = len(names)
    if m.shape != (n, n):
        raise ValueError(f"matrix has shape {tuple(m.shape)} but there are {n} names")
    fig = go.Figure(go.Heatmap(
        z=m.tolist(), x=list(names), y=list(names), colorscale=DIVERGING, zmid=0,
        colorbar=dict(title=dict(text="cosine", side="right"), orientation="h", x=0, xanchor="left", y=1.02,
                      yanchor="bottom", len=0.5, thickness=12),
        hovertemplate="<b>%{y}</b> vs <b>%{x}</b><br>cosine %{z:+.3f}<extra></extra>",
    ))
    size = max(450, min(900, 200 + 28 * n))
    fig.update_layout(
        template=TEMPLATE, title=title, width=size + 100, height=size + 60, margin=dict(t=120),
        xaxis=dict(title="persona", tickangle=-45, constrain="domain"),
        yaxis=dict(title="persona", autorange="reversed", scaleanchor="x"),
    )
    return fig


def pca_scatter(
    projections: Float[Tensor, "n k"] | Float[np.ndarray, "n k"],
    explained: Float[Tensor, " k"] | Float[np.ndarray, " k"],
    names: Sequence[str],
    color: Float[Tensor, " n"],
    color_label: str,
    title: str,
) -> go.Figure:
    """PC1 vs PC2 of the persona vectors, each point labelled and coloured by ``color``.

    Args:
        projections: ``[n, k]`` coordinates on the principal components (``k >= 1``; PC2 = 0 if ``k == 1``), a
            tensor or a numpy array (``PCA.fit_transform``'s result).
        explained: ``[k]`` fraction of variance each component explains (e.g. ``pca.explained_variance_ratio_``).
        names: the ``n`` personas.
        color: ``[n]`` values for the colour scale (e.g. the projection on the Assistant Axis).
        color_label: the colour bar's title.
        title: the figure's title.
    """
    p = torch.as_tensor(projections).detach().to("cpu", torch.float64)
    ev = _floats(explained, "explained")
    c = _floats(color, "color")
    n = len(names)
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 1:
        raise ValueError(f"projections must be [n={n}, k>=1], got shape {tuple(p.shape)}")
    if len(ev) < p.shape[1] or len(c) != n:
        raise ValueError(f"explained needs {p.shape[1]} entries (got {len(ev)}), color needs {n} (got {len(c)})")
    xs = p[:, 0].tolist()
    has_pc2 = p.shape[1] >= 2
    ys = p[:, 1].tolist() if has_pc2 else [0.0] * n
    finite = [v for v in c if math.isfinite(v)]
    cmid = 0.0 if finite and min(finite) < 0 < max(finite) else None
    fig = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers+text", text=list(names), textposition="top center",
        textfont=dict(size=10),
        marker=dict(size=11, color=c, colorscale=DIVERGING, cmid=cmid, line=dict(width=0.5, color="#333"),
                    colorbar=_bottom_colorbar(color_label), showscale=True),
        customdata=c,
        hovertemplate=(f"<b>%{{text}}</b><br>PC1 %{{x:.3f}}<br>PC2 %{{y:.3f}}<br>{color_label} "
                       f"%{{customdata:.3f}}<extra></extra>"),
    ))
    pc2_title = f"PC2 ({100 * ev[1]:.1f}% of variance)" if has_pc2 else "PC2 (not computed: only 1 component)"
    fig.update_layout(
        template=TEMPLATE, title=title, height=680, width=850, margin=dict(b=160),
        xaxis=dict(title=f"PC1 ({100 * ev[0]:.1f}% of variance)", zeroline=True),
        yaxis=dict(title=pc2_title, zeroline=True),
    )
    return fig


def axis_strip(projections: Mapping[str, float], defaults: Sequence[str], title: str) -> go.Figure:
    """Personas along the Assistant Axis: x = projection, defaults drawn as diamonds in another colour.

    Labels are staggered above and below the line (with leader lines) so close personas stay readable.
    """
    order = sorted(projections.items(), key=lambda kv: kv[1])
    default_set = set(defaults)
    fig = go.Figure()
    for is_default, colour, symbol, label in [(True, DEFAULT_COLOUR, "diamond", "default persona"),
                                              (False, ROLE_COLOUR, "circle", "role")]:
        group = [(n, v) for n, v in order if (n in default_set) == is_default]
        fig.add_trace(go.Scatter(
            x=[v for _, v in group], y=[0.0] * len(group), mode="markers", name=label,
            text=[n for n, _ in group],
            marker=dict(size=13 if is_default else 11, color=colour, symbol=symbol,
                        line=dict(width=1, color="#333")),
            hovertemplate=f"<b>%{{text}}</b> ({label})<br>projection %{{x:.3f}}<extra></extra>",
        ))
    offsets = [40, -40, 80, -80, 120, -120]  # pixels above (+) / below (-) the line, cycled
    for i, (name, value) in enumerate(order):
        is_default = name in default_set
        fig.add_annotation(
            x=value, y=0, text=f"<b>{name}</b>" if is_default else name, showarrow=True, arrowhead=0,
            arrowwidth=0.7, arrowcolor="#999", ax=0, ay=-offsets[i % len(offsets)],
            font=dict(size=11, color=DEFAULT_COLOUR if is_default else "#222"),
        )
    fig.update_layout(
        template=TEMPLATE, title=title, height=420,
        xaxis=dict(title="projection on the Assistant Axis (higher = more assistant-like)", zeroline=True),
        yaxis=dict(visible=False, range=[-1, 1]),
    )
    return _legend_on_top(fig)


def trait_bars(ranking: Sequence[tuple[str, float]], title: str, top: int = 10) -> go.Figure:
    """Horizontal bars of each trait's cosine with the axis, highest at the top.

    With more than ``2 * top`` traits, only the ``top`` highest and ``top`` lowest are shown.
    """
    ordered = sorted(ranking, key=lambda kv: kv[1], reverse=True)
    shown = ordered if len(ordered) <= 2 * top else ordered[:top] + ordered[-top:]
    names = [t for t, _ in shown]
    values = [float(v) for _, v in shown]
    colours = [DEFAULT_COLOUR if v >= 0 else ROLE_COLOUR for v in values]
    note = "" if len(shown) == len(ordered) else f" (top and bottom {top} of {len(ordered)})"
    fig = go.Figure(go.Bar(
        x=values, y=names, orientation="h", marker_color=colours,
        text=[f"{v:+.2f}" for v in values], textposition="outside",
        hovertemplate="<b>%{y}</b><br>cosine with the axis %{x:+.3f}<extra></extra>",
    ))
    fig.update_layout(
        template=TEMPLATE, title=title + note, height=max(350, 120 + 26 * len(shown)),
        xaxis=dict(title="cosine similarity with the Assistant Axis (+ = toward the assistant)", zeroline=True),
        yaxis=dict(title="trait", autorange="reversed"),
        showlegend=False,
    )
    return fig


def control_bars(results: Mapping[str, Mapping[str, float]], title: str) -> go.Figure:
    """Grouped bars of ``auc`` and ``corr_with_main`` for each control, with a dashed line at AUC 0.5."""
    labels = list(results)
    ticks = [_wrap(label) for label in labels]
    values = []
    fig = go.Figure()
    for metric, name, colour in [("auc", "AUC (assistant-like vs fantastical)", "#2166ac"),
                                 ("corr_with_main", "correlation with the main projection", "#999999")]:
        ys = [float(results[label][metric]) for label in labels]
        values += [y for y in ys if math.isfinite(y)]
        fig.add_trace(go.Bar(
            x=ticks, y=ys, name=name, marker_color=colour, customdata=labels,
            text=[f"{y:.2f}" if math.isfinite(y) else "n/a" for y in ys], textposition="outside",
            hovertemplate=f"<b>%{{customdata}}</b><br>{name}: %{{y:.3f}}<extra></extra>",
        ))
    low = -1.0 if any(v < 0 for v in values) else 0.0
    fig.add_hline(y=0.5, line_dash="dash", line_color="#b2182b",
                  annotation_text="chance AUC = 0.5", annotation_position="top left")
    fig.update_layout(
        template=TEMPLATE, title=title, barmode="group", height=500,
        xaxis=dict(title="representation the axis is built from"),
        yaxis=dict(title="AUC / correlation", range=[low, 1.1]),
    )
    return _legend_on_top(fig)


# ---------------------------------------------------------------------------------------------------
# Part 2: drift, steering and capping
# ---------------------------------------------------------------------------------------------------

SERIES_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
UNSTEERED_COLOUR, CAPPED_COLOUR, THRESHOLD_COLOUR = "#b2182b", "#2166ac", "#444444"


def _threshold_line(fig: go.Figure, threshold: float | None, label: str = "threshold") -> None:
    if threshold is None:
        return
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"threshold must be finite (or None for no line); got {threshold!r}")
    fig.add_hline(y=t, line_dash="dash", line_color=THRESHOLD_COLOUR,
                  annotation_text=f"{label}: {t:.3g}", annotation_position="bottom left")


def drift_plot(series: Mapping[str, Sequence[float]], threshold: float | None, title: str,
               threshold_label: str = "threshold") -> go.Figure:
    """Projection on the Assistant Axis against assistant turn, one line per transcript.

    Args:
        series: ``{transcript name: [n_turns] per-turn projections}`` (tensors or sequences); turns are
            numbered from 1 on the x axis.
        threshold: a threshold at the projections' layer, drawn as a dashed horizontal line; None for no line.
        title: the figure's title.
        threshold_label: the line's label, shown with its value: say which layer it belongs to, and whether
            that layer is capped (e.g. ``"capping threshold at layer 21"``).
    """
    if not series:
        raise ValueError("drift_plot got no series: give {transcript name: per-turn projections}.")
    fig = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        ys = _floats(values, f"series[{name!r}]")
        fig.add_trace(go.Scatter(
            x=list(range(1, len(ys) + 1)), y=ys, mode="lines+markers", name=str(name),
            line=dict(color=SERIES_COLOURS[i % len(SERIES_COLOURS)]),
            hovertemplate=f"<b>{name}</b><br>turn %{{x}}<br>projection %{{y:.3f}}<extra></extra>",
        ))
    _threshold_line(fig, threshold, threshold_label)
    fig.update_layout(
        template=TEMPLATE, title=title, height=480,
        xaxis=dict(title="assistant turn (from 1)", dtick=1 if max(len(t.x) for t in fig.data) <= 30 else None),
        yaxis=dict(title="projection on the Assistant Axis (higher = more assistant-like)"),
    )
    return _legend_on_top(fig, "transcript")


def paired_drift_plot(uncapped: Sequence[float], capped: Sequence[float], threshold: float | None,
                      title: str, threshold_label: str = "threshold",
                      names: tuple[str, str] = ("uncapped", "capped")) -> go.Figure:
    """The same user turns answered without and with capping: two projection-vs-turn lines on one plot.

    ``names`` are the two lines' legend entries; ``threshold_label`` as in :func:`drift_plot`.
    """
    if len(names) != 2:
        raise ValueError(f"names must be two legend entries (without, with capping); got {names!r}")
    fig = drift_plot({names[0]: uncapped, names[1]: capped}, threshold, title, threshold_label=threshold_label)
    fig.data[0].line.color, fig.data[1].line.color = UNSTEERED_COLOUR, CAPPED_COLOUR
    return _legend_on_top(fig, "replies")


def dose_response_plot(summary: Mapping[float, Mapping[str, float | None]], title: str,
                       rates: Mapping[str, Mapping[float, float | None]] | None = None) -> go.Figure:
    """Steering dose-response against the coefficient: mean projection (top) and rates in 0..1 (bottom).

    Two rows that share the x axis, so that no axis sits at the figure's right edge.

    Args:
        summary: ``{coefficient: {"mean_projection", "role_rate", "n", ...}}`` as from
            :func:`utils.experiments.dose_response`; a None value leaves a gap.
        title: the figure's title.
        rates: more fractions to draw beside the role rate, ``{legend label: {coefficient: value or None}}``
            (e.g. from :func:`utils.experiments.self_description_rates`); each must have the summary's
            coefficients.
    """
    if not summary:
        raise ValueError("dose_response_plot got an empty summary; run utils.experiments.dose_response first.")
    coeffs = sorted(summary, key=float)
    for c in coeffs:
        missing = {"mean_projection", "role_rate"} - set(summary[c])
        if missing:
            raise ValueError(f"summary[{c}] lacks {sorted(missing)}; it must come from utils.experiments.dose_response.")
    for label, values in (rates or {}).items():
        if {float(c) for c in values} != {float(c) for c in coeffs}:
            raise ValueError(f"rates[{label!r}] has coefficients {sorted(values)}, the summary {coeffs}: give one "
                             "value (or None) per coefficient.")
    xs = [float(c) for c in coeffs]

    def column(key: str) -> list[float | None]:
        return [None if summary[c][key] is None else float(summary[c][key]) for c in coeffs]

    ns = [summary[c].get("n", "?") for c in coeffs]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.55, 0.45])
    fig.add_trace(go.Scatter(
        x=xs, y=column("mean_projection"), mode="lines+markers", name="mean projection of the reply (top)",
        line=dict(color=CAPPED_COLOUR), customdata=ns,
        hovertemplate="coefficient %{x:+.3g}<br>mean projection %{y:.3f}<br>n = %{customdata}<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=xs, y=column("role_rate"), mode="lines+markers", name="role rate (role replies scored 3)",
        line=dict(color=UNSTEERED_COLOUR, dash="dot"), customdata=ns,
        hovertemplate="coefficient %{x:+.3g}<br>role rate %{y:.0%}<br>n = %{customdata}<extra></extra>",
    ), row=2, col=1)
    for i, (label, values) in enumerate((rates or {}).items()):
        by_coeff = {float(c): v for c, v in values.items()}
        fig.add_trace(go.Scatter(
            x=xs, y=[None if by_coeff[x] is None else float(by_coeff[x]) for x in xs], mode="lines+markers",
            name=label, line=dict(color=SERIES_COLOURS[(i + 2) % len(SERIES_COLOURS)], dash="dash"),
            hovertemplate=f"coefficient %{{x:+.3g}}<br>{label}: %{{y:.0%}}<extra></extra>",
        ), row=2, col=1)
    for row in (1, 2):
        fig.add_vline(x=0.0, line_dash="dot", line_color="#999", row=row, col=1)
    fig.update_layout(
        template=TEMPLATE, title=title, height=620,
    )
    _legend_on_top(fig)
    fig.update_xaxes(title_text="steering coefficient along the unit axis (+ = toward the assistant)", row=2, col=1)
    fig.update_yaxes(title_text="mean projection of the generated text", row=1, col=1)
    fig.update_yaxes(title_text="fraction of replies", range=[-0.05, 1.05], tickformat=".0%", row=2, col=1)
    return fig


def kl_histogram(kl_values: Sequence[float], title: str, nbins: int = 50) -> go.Figure:
    """Histogram of per-position KL(uncapped || capped) values (nats), with the mean marked."""
    values = _floats(kl_values, "kl_values")
    if not values:
        raise ValueError("kl_histogram got no values.")
    mean = sum(values) / len(values)
    fig = go.Figure(go.Histogram(x=values, nbinsx=nbins, marker_color=CAPPED_COLOUR,
                                 hovertemplate="KL %{x}<br>%{y} positions<extra></extra>"))
    fig.add_vline(x=mean, line_dash="dash", line_color=THRESHOLD_COLOUR,
                  annotation_text=f"mean {mean:.3g} nats", annotation_position="top right")
    fig.update_layout(
        template=TEMPLATE, title=f"{title} ({len(values)} positions)", height=400,
        xaxis=dict(title="KL(uncapped || capped) of the next-token distribution (nats)"),
        yaxis=dict(title="positions"), showlegend=False,
    )
    return fig


# ---------------------------------------------------------------------------------------------------
# Part 3: lines and points of several named series
# ---------------------------------------------------------------------------------------------------

def _series_xy(xs, ys, name: str) -> tuple[list[float], list[float | None]]:
    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys):
        raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values.")
    return [float(x) for x in xs], [None if y is None or not math.isfinite(float(y)) else float(y) for y in ys]


def lines_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]], title: str, x_title: str,
               y_title: str, y_range: tuple[float, float] | None = None, dash: Mapping[str, str] | None = None) -> go.Figure:
    """One line with markers per named series ``{name: (xs, ys)}``; a None y leaves a gap (a point nobody scored)."""
    if not series:
        raise ValueError("lines_plot got no series.")
    fig = go.Figure()
    for name, (xs, ys) in series.items():
        x, y = _series_xy(xs, ys, name)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name,
                                 line=dict(dash=(dash or {}).get(name, "solid")),
                                 hovertemplate=f"{name}<br>%{{x}}: %{{y:.3g}}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title, height=420, xaxis=dict(title=x_title),
                      yaxis=dict(title=y_title, range=list(y_range) if y_range else None),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0), margin=dict(t=90))
    return fig


def points_plot(groups: Mapping[str, tuple[Sequence[float], Sequence[float | None]]], title: str, x_title: str,
                y_title: str) -> go.Figure:
    """A scatter of named groups of points ``{name: (xs, ys)}`` (points with a None y are left out)."""
    if not groups:
        raise ValueError("points_plot got no groups.")
    fig = go.Figure()
    for name, (xs, ys) in groups.items():
        x, y = _series_xy(xs, ys, name)
        kept = [(a, b) for a, b in zip(x, y) if b is not None]
        fig.add_trace(go.Scatter(x=[a for a, _ in kept], y=[b for _, b in kept], mode="markers", name=name,
                                 hovertemplate=f"{name}<br>x %{{x:.3g}}<br>y %{{y:.3g}}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title, height=450, xaxis=dict(title=x_title), yaxis=dict(title=y_title),
                      legend=dict(orientation="v"), margin=dict(t=70))
    return fig
