"""An ipywidgets chat panel: talk to the model, watch each reply's projection on the Assistant Axis, toggle capping.

    panel = ChatPanel(model, tokenizer, axis[LAYER], LAYER, cap_axes=axes, cap_thresholds=taus)
    panel.widget          # display it in a notebook cell
    panel.send("Hello")   # or drive it from code (tests do): returns the reply

Generation is local (:func:`utils.generation.generate`, greedy by default), so it needs no API
key. Enter in the text box sends, as the Send button does. With the capping toggle on (its label says
"capping: ON" or "capping: off", so the page shows the state it is in, also after a reload), the reply
is generated inside :func:`utils.steering.capping` with ``cap_axes``/``cap_thresholds``; the hooks are
removed as soon as the reply is written.

The plotted value of a reply is the mean block output at ``layer`` over the reply's content tokens,
projected on the unit axis (Part 1's rule, as :func:`utils.activations.per_turn_projections` applies it to
every turn), computed by re-reading the conversation with the *unmodified* model: it measures the
text, capped or not, the same way the drift plots measure transcripts. The dashed line is the
threshold at ``layer`` (``cap_thresholds[layer]``, or the ``threshold`` argument), labelled with its layer
and whether that layer is capped: a line from another layer than the capped ones would be a different
number on a different axis.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Mapping

import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import display
from jaxtyping import Float
from torch import Tensor

from utils.activations import decoder_layers, extract_mean_activations, unit_vector
from utils.conversation import Message
from utils.experiments import EmptyReplyError, fit_history
from utils.generation import generate
from utils.models import context_length
from utils.plots import TEMPLATE, THRESHOLD_COLOUR
from utils.steering import capping

__all__ = ["ChatPanel"]

_UNCAPPED, _CAPPED = "#b2182b", "#2166ac"


class ChatPanel:
    """A chat box with a live plot of each reply's projection on the axis at ``layer``.

    Args:
        model, tokenizer: the local model that answers.
        axis: ``[d_model]``, the Assistant Axis at ``layer`` (normalised here).
        layer: the block whose output is projected (``model.model.layers[layer]``).
        cap_axes: ``{layer: [d_model] axis}`` for capping; with ``cap_thresholds`` it enables the toggle.
        cap_thresholds: ``{layer: tau}``, the same layers as ``cap_axes``.
        system_prompt: the conversation's system prompt ("" for none).
        max_new_tokens: the longest reply, in tokens.
        threshold: the line drawn on the plot; default ``cap_thresholds[layer]`` when ``layer`` is capped.
        temperature: 0 (default) is greedy decoding.
        max_context: the context to fit the history in (default: the model's, at most 8192); the oldest
            whole turns are dropped from what the model reads when it is full
            (:func:`utils.experiments.fit_history`), never cut.

    Attributes:
        widget: the top-level ipywidgets widget to display.
        history: the conversation so far (``[system?] + user/assistant turns``).
        projections: each reply's projection, in order; ``capped_flags``: whether it was generated capped.
        figure: the plotly figure shown (re-rendered after each reply).
    """

    def __init__(
        self,
        model,
        tokenizer,
        axis: Float[Tensor, " d_model"],
        layer: int,
        *,
        cap_axes: Mapping[int, Float[Tensor, " d_model"]] | None = None,
        cap_thresholds: Mapping[int, float] | None = None,
        system_prompt: str = "",
        max_new_tokens: int = 64,
        threshold: float | None = None,
        temperature: float = 0.0,
        max_context: int | None = None,
    ):
        n_layers = len(decoder_layers(model))
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"layer must be an int in 0..{n_layers - 1}; got {layer!r}.")
        if (cap_axes is None) != (cap_thresholds is None):
            raise ValueError("Pass both cap_axes and cap_thresholds (to enable capping) or neither.")
        if cap_axes is not None and set(cap_axes) != set(cap_thresholds):
            raise ValueError("cap_axes and cap_thresholds must have the same layers; got "
                             f"{sorted(cap_axes)} and {sorted(cap_thresholds)}.")
        if cap_axes is not None and not cap_axes:
            raise ValueError("cap_axes is empty: give at least one {layer: axis}, or None for no capping.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}.")
        self.model, self.tokenizer, self.layer = model, tokenizer, layer
        self.unit_axis = unit_vector(axis, int(model.config.hidden_size))
        self.cap_axes = dict(cap_axes) if cap_axes is not None else None
        self.cap_thresholds = dict(cap_thresholds) if cap_thresholds is not None else None
        if threshold is None and self.cap_thresholds is not None:
            threshold = self.cap_thresholds.get(layer)
        self.threshold = None if threshold is None else float(threshold)
        self.max_new_tokens, self.temperature = max_new_tokens, float(temperature)
        self.budget = (max_context or context_length(model)) - max_new_tokens
        if self.budget < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context.")
        self.history: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.projections: list[float] = []
        self.capped_flags: list[bool] = []

        self.text = widgets.Text(placeholder="Say something to the model, then press Enter...",
                                 layout=widgets.Layout(width="auto", flex="1 1 auto", min_width="12em"))
        self.send_button = widgets.Button(description="Send", button_style="primary",
                                          layout=widgets.Layout(width="auto", flex="0 0 auto"))
        # The label says the state ("capping: ON" / "capping: off"), so the page shows what the kernel has, and
        # the button never shrinks below its label.
        self.cap_toggle = widgets.ToggleButton(
            value=False, description=self._toggle_label(False), icon="shield",
            disabled=self.cap_axes is None,
            tooltip=(f"Generate inside capping(...) at layers {self._cap_layers_text()}" if self.cap_axes is not None
                     else "No cap_axes/cap_thresholds were given, so capping is unavailable"),
            layout=widgets.Layout(width="auto", min_width="13em", flex="0 0 auto"))
        self.reset_button = widgets.Button(description="Reset", layout=widgets.Layout(width="auto", flex="0 0 auto"))
        self.status = widgets.HTML(value=self._status_text())
        self.conversation_view = widgets.HTML(layout=widgets.Layout(width="50%", max_height="480px", overflow="auto"))
        # The live plot is an inline SVG in an HTML widget, redrawn after each reply. (An ``Output`` widget
        # that re-displays a plotly figure made headless runs hang: nbclient waits on its captured output.)
        self.plot_view = widgets.HTML(layout=widgets.Layout(width="50%"))
        self.widget = widgets.VBox([
            widgets.HBox([self.text, self.send_button, self.cap_toggle, self.reset_button]),
            self.status,
            widgets.HBox([self.conversation_view, self.plot_view]),
        ])
        self.send_button.on_click(self._on_send)
        with warnings.catch_warnings():  # ipywidgets 8 deprecates on_submit, but its Text still sends Enter as "submit"
            warnings.simplefilter("ignore", DeprecationWarning)
            self.text.on_submit(self._on_send)
        self.cap_toggle.observe(self._on_toggle, names="value")
        self.reset_button.on_click(lambda _button: self.reset())
        self.figure = self._make_figure()
        self._render()

    # -- the public API ------------------------------------------------------------------------------

    @property
    def capping_on(self) -> bool:
        return bool(self.cap_toggle.value)

    def send(self, text: str) -> str:
        """Send ``text`` as the user, generate the reply (capped if the toggle is on), plot its projection.

        Returns:
            the reply. On an error (e.g. an empty reply) the user turn is taken back and the error raised.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("The message is empty: type something to send.")
        self.history.append({"role": "user", "content": text})
        try:
            prompt = fit_history(self.history, self.tokenizer, self.budget)
            capped = self.capping_on
            if capped and self.cap_axes is None:
                raise RuntimeError("Capping is on but no cap_axes/cap_thresholds were given.")
            seed = len(self.projections)
            if capped:
                with capping(self.model, self.cap_axes, self.cap_thresholds):
                    reply = generate(self.model, self.tokenizer, [prompt], self.max_new_tokens,
                                                    self.temperature, seed=seed)[0]
            else:
                reply = generate(self.model, self.tokenizer, [prompt], self.max_new_tokens,
                                                self.temperature, seed=seed)[0]
            if not reply.strip():
                raise EmptyReplyError("The model wrote an empty reply; try again or rephrase.")
            mean = extract_mean_activations(self.model, self.tokenizer,
                                            [prompt + [{"role": "assistant", "content": reply}]],
                                            self.layer, progress=False)[0]
        except BaseException:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": reply})
        self.projections.append(float(mean @ self.unit_axis))
        self.capped_flags.append(capped)
        self._update_figure()
        self._render()
        return reply

    def reset(self) -> None:
        """Forget the conversation (keep the system prompt) and clear the plot."""
        self.history = [m for m in self.history if m["role"] == "system"]
        self.projections.clear()
        self.capped_flags.clear()
        self._update_figure()
        self._render()

    # -- widgets -------------------------------------------------------------------------------------

    def _on_send(self, _widget) -> None:
        """The Send button's and the text box's Enter handler."""
        if self.send_button.disabled:  # a reply is being written (Enter pressed twice)
            return
        text = self.text.value
        self.send_button.disabled = True
        self.status.value = "<i>generating...</i>"
        try:
            self.send(text)
            self.text.value = ""
            self.status.value = self._status_text()
        except Exception as exc:  # shown in the panel, not lost in a callback
            self.status.value = f"<span style='color:#b2182b'><b>{type(exc).__name__}</b>: {html.escape(str(exc))}</span>"
        finally:
            self.send_button.disabled = False

    def _cap_layers_text(self) -> str:
        layers = sorted(self.cap_axes or {})
        if not layers:
            return "none"
        contiguous = layers == list(range(layers[0], layers[-1] + 1))
        return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ", ".join(map(str, layers))

    @staticmethod
    def _toggle_label(on: bool) -> str:
        return "capping: ON" if on else "capping: off"

    def _on_toggle(self, change) -> None:
        self.cap_toggle.description = self._toggle_label(bool(change["new"]))
        self.status.value = self._status_text()

    def _threshold_label(self) -> str:
        if self.cap_thresholds is not None and self.layer in self.cap_thresholds:
            return f"capping threshold at layer {self.layer}"
        capped = f"; capping acts at layers {self._cap_layers_text()}" if self.cap_axes is not None else ""
        return f"threshold at layer {self.layer} (not capped{capped})"

    def _status_text(self) -> str:
        if self.cap_axes is None:
            cap = "capping unavailable (no cap_axes given)"
        elif self.capping_on:
            cap = f"<b>capping is ON</b> at layers {self._cap_layers_text()}: the next reply is capped"
        else:
            cap = f"capping is off (toggle it to cap layers {self._cap_layers_text()})"
        return (f"<small>projection at layer {self.layer}; {cap}; Enter or Send to send; local model, no API key "
                "needed</small>")

    def _make_figure(self) -> go.Figure:
        fig = go.Figure(go.Scatter(
            x=[], y=[], mode="lines+markers", name="reply", line=dict(color="#999"),
            marker=dict(size=10, color=[]), customdata=[],
            hovertemplate="reply %{x}<br>projection %{y:.3f}<br>%{customdata}<extra></extra>",
        ))
        # Legend entries for the marker colours.
        for name, colour in [("uncapped", _UNCAPPED), ("capped", _CAPPED)]:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, marker=dict(size=10, color=colour),
                                     hoverinfo="skip"))
        if self.threshold is not None:
            fig.add_hline(y=self.threshold, line_dash="dash", line_color=THRESHOLD_COLOUR,
                          annotation_text=f"{self._threshold_label()}: {self.threshold:.3g}",
                          annotation_position="bottom left")
        fig.update_layout(template=TEMPLATE, title=f"Each reply's projection on the axis (layer {self.layer})",
                          height=380, xaxis=dict(title="reply", dtick=1),
                          yaxis=dict(title="projection (higher = more assistant-like)"),
                          legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0), margin=dict(t=90))
        return fig

    def _update_figure(self) -> None:
        trace = self.figure.data[0]
        trace.x = list(range(1, len(self.projections) + 1))
        trace.y = list(self.projections)
        trace.marker.color = [_CAPPED if c else _UNCAPPED for c in self.capped_flags]
        trace.customdata = ["capped" if c else "uncapped" for c in self.capped_flags]

    def _render(self) -> None:
        parts, reply = [], 0
        for m in self.history:
            role, colour = m["role"], {"system": "#777", "user": "#222", "assistant": _UNCAPPED}[m["role"]]
            if role == "assistant":
                if self.capped_flags[reply]:
                    role, colour = "assistant (capped)", _CAPPED
                role += f" [{self.projections[reply]:+.2f}]"
                reply += 1
            parts.append(f"<div style='margin:4px 0'><b style='color:{colour}'>{html.escape(role)}</b>: "
                         f"<span style='white-space:pre-wrap'>{html.escape(m['content'])}</span></div>")
        self.conversation_view.value = "".join(parts) or "<i>No messages yet.</i>"
        self.plot_view.value = self._svg()

    def _svg(self, width: int = 420, height: int = 300) -> str:
        """The projections so far as a small SVG line chart (the same data as :attr:`figure`)."""
        pad_l, pad_r, pad_t, pad_b = 56, 12, 34, 36
        title = f"<text x='{pad_l}' y='18' font-size='13'>Each reply's projection (layer {self.layer})</text>"
        values = list(self.projections) + ([self.threshold] if self.threshold is not None else [])
        if not self.projections:
            return (f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg' "
                    f"font-family='sans-serif'>{title}<text x='{pad_l}' y='{height // 2}' font-size='12' "
                    "fill='#777'>No replies yet.</text></svg>")
        lo, hi = min(values), max(values)
        if hi - lo < 1e-9:
            lo, hi = lo - 1.0, hi + 1.0
        lo, hi = lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo)
        n = len(self.projections)

        def x(i: int) -> float:
            return pad_l + (width - pad_l - pad_r) * (i / max(n - 1, 1) if n > 1 else 0.5)

        def y(v: float) -> float:
            return pad_t + (height - pad_t - pad_b) * (hi - v) / (hi - lo)

        parts = [f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg' font-family='sans-serif'>",
                 title,
                 f"<line x1='{pad_l}' y1='{pad_t}' x2='{pad_l}' y2='{height - pad_b}' stroke='#444'/>",
                 f"<line x1='{pad_l}' y1='{height - pad_b}' x2='{width - pad_r}' y2='{height - pad_b}' stroke='#444'/>",
                 f"<text x='4' y='{pad_t + 4}' font-size='11'>{hi:.3g}</text>",
                 f"<text x='4' y='{height - pad_b}' font-size='11'>{lo:.3g}</text>",
                 f"<text x='{width // 2 - 16}' y='{height - 8}' font-size='11'>reply</text>"]
        if self.threshold is not None:
            ty = y(self.threshold)
            parts.append(f"<line x1='{pad_l}' y1='{ty:.1f}' x2='{width - pad_r}' y2='{ty:.1f}' stroke='#555' "
                         f"stroke-dasharray='6 4'/><text x='{pad_l + 4}' y='{ty - 4:.1f}' font-size='11' "
                         f"fill='#555'>{html.escape(self._threshold_label())}: {self.threshold:.3g}</text>")
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(self.projections))
        parts.append(f"<polyline points='{points}' fill='none' stroke='#999' stroke-width='2'/>")
        for i, (v, capped) in enumerate(zip(self.projections, self.capped_flags)):
            colour = _CAPPED if capped else _UNCAPPED
            parts.append(f"<circle cx='{x(i):.1f}' cy='{y(v):.1f}' r='5' fill='{colour}'>"
                         f"<title>reply {i + 1}: {v:.3f} ({'capped' if capped else 'uncapped'})</title></circle>")
            parts.append(f"<text x='{x(i) - 3:.1f}' y='{height - pad_b + 14}' font-size='10'>{i + 1}</text>")
        parts.append("</svg>")
        legend = (f"<div style='font-size:11px'><span style='color:{_UNCAPPED}'>&#9679;</span> uncapped &nbsp; "
                  f"<span style='color:{_CAPPED}'>&#9679;</span> capped</div>")
        return "".join(parts) + legend

    def _ipython_display_(self):  # displaying the panel shows its widget
        display(self.widget)
