"""The chat panel (utils/chat_panel.py), driven from code without a browser, on tiny-gemma2."""

import pytest
import torch

from utils.activations import decoder_layers, extract_mean_activations
from utils.chat_panel import ChatPanel


def _hooks(model) -> int:
    return sum(len(block._forward_hooks) for block in decoder_layers(model))


def test_panel_sends_with_and_without_capping(tiny):
    import ipywidgets as widgets

    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    axis = torch.randn(model.config.hidden_size, generator=g)
    panel = ChatPanel(model, tok, axis, 3, cap_axes={3: axis, 4: axis}, cap_thresholds={3: 0.5, 4: 0.0},
                      system_prompt="You are helpful.", max_new_tokens=6)
    assert isinstance(panel.widget, widgets.Widget)
    assert panel.threshold == 0.5 and len(panel.figure.layout.shapes) == 1  # the threshold line
    before = _hooks(model)

    first = panel.send("Hello there!")
    assert isinstance(first, str) and first
    assert _hooks(model) == before
    panel.cap_toggle.value = True
    second = panel.send("Tell me about yourself.")
    assert _hooks(model) == before  # capping hooks removed after the reply

    assert [m["role"] for m in panel.history] == ["system", "user", "assistant", "user", "assistant"]
    assert panel.history[2]["content"] == first and panel.history[4]["content"] == second
    assert panel.capped_flags == [False, True]
    trace = panel.figure.data[0]
    assert list(trace.x) == [1, 2] and len(trace.y) == 2  # one point per reply
    # The plotted value is the mean over the reply's tokens at the layer, on the unit axis.
    expected = extract_mean_activations(model, tok, [panel.history[:3]], 3, progress=False)[0] @ (axis / axis.norm())
    assert trace.y[0] == pytest.approx(float(expected), abs=1e-5)
    assert "capped" in panel.conversation_view.value

    # The Send button drives the same path, and errors land in the status line.
    panel.text.value = "One more."
    panel.send_button.click()
    assert len(panel.figure.data[0].y) == 3 and panel.text.value == ""
    panel.text.value = "   "
    panel.send_button.click()
    assert "empty" in panel.status.value and len(panel.history) == 7

    panel.reset()
    assert panel.history == [{"role": "system", "content": "You are helpful."}] and len(panel.figure.data[0].y) == 0


def test_panel_without_capping_disables_the_toggle(tiny):
    model, tok = tiny
    axis = torch.ones(model.config.hidden_size)
    panel = ChatPanel(model, tok, axis, 2, max_new_tokens=4)
    assert panel.cap_toggle.disabled and panel.threshold is None and len(panel.figure.layout.shapes) == 0
    panel.send("Hi")
    assert len(panel.projections) == 1
    with pytest.raises(ValueError, match="both cap_axes and cap_thresholds"):
        ChatPanel(model, tok, axis, 2, cap_axes={2: axis})
    with pytest.raises(ValueError, match=r"\[d_model\]"):
        ChatPanel(model, tok, axis[:3], 2)


def test_the_live_plot_is_an_svg_with_one_point_per_reply_and_the_threshold(panel_factory=None):
    """The panel draws its plot as inline SVG in an HTML widget (no Output widget: headless runs hung on it)."""
    from utils.chat_panel import ChatPanel

    panel = ChatPanel.__new__(ChatPanel)
    panel.layer, panel.threshold = 3, 0.5
    panel.cap_axes, panel.cap_thresholds = {3: None, 4: None}, {3: 0.5, 4: 0.0}
    panel.projections, panel.capped_flags = [1.0, 0.2, 0.7], [False, True, False]
    svg = panel._svg()
    assert svg.count("<circle") == 3 and "capping threshold at layer 3: 0.5" in svg and "stroke-dasharray" in svg
    panel.projections, panel.capped_flags = [], []
    assert "No replies yet" in panel._svg()


def test_the_threshold_line_names_its_layer_and_whether_it_is_capped():
    """A line drawn at a layer that is not capped must not read as the capping threshold."""
    panel = ChatPanel.__new__(ChatPanel)
    panel.layer, panel.threshold, panel.projections, panel.capped_flags = 15, 4.71, [5.0], [True]
    panel.cap_axes, panel.cap_thresholds = {21: None, 22: None, 23: None}, {21: -18.0, 22: -20.0, 23: -25.0}
    svg = panel._svg()
    assert "threshold at layer 15 (not capped; capping acts at layers 21-23): 4.71" in svg
    assert "capping threshold" not in svg
    panel.layer, panel.threshold = 21, -18.0
    assert "capping threshold at layer 21: -18" in panel._svg()


def test_enter_sends_and_the_toggle_label_says_the_state(tiny):
    model, tok = tiny
    axis = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    panel = ChatPanel(model, tok, axis, 3, cap_axes={3: axis, 4: axis}, cap_thresholds={3: 0.5, 4: 0.0},
                      max_new_tokens=5)
    assert panel.cap_toggle.description == "capping: off" and "capping is off" in panel.status.value
    panel.text.value = "Hello there!"
    panel.text._handle_string_msg(None, {"event": "submit"}, [])  # what the browser sends on Enter
    assert [m["role"] for m in panel.history] == ["user", "assistant"] and panel.text.value == ""
    panel.cap_toggle.value = True
    assert panel.cap_toggle.description == "capping: ON" and "capping is ON" in panel.status.value
    panel.text.value = "Again."
    panel.text._handle_string_msg(None, {"event": "submit"}, [])
    assert panel.capped_flags == [False, True]
    assert "capping is ON" in panel.status.value  # the status after a reply still says the state
    panel.cap_toggle.value = False
    assert panel.cap_toggle.description == "capping: off"
