"""Interventions on the residual stream: steering (adding a vector) and activation capping.

Everything here acts on *block outputs*: "layer l" is the output of ``model.model.layers[l]``
(``hidden_states[l + 1]``), the course's convention everywhere.

- :func:`cap_activations` is the capping formula on a tensor, with no model involved.
- :func:`intervene` is the one context manager that registers the forward hooks; :func:`steering`
  and :func:`capping` are thin wrappers of it. Hooks are always removed when the block exits,
  normally or through an exception.
- :class:`ProjectionProbe` records the projection of block outputs on an axis during forward passes.
- :func:`capping_thresholds` gives the paper's thresholds (the capping layers are in
  :data:`utils.models.MODEL_CONFIGS`).
- :func:`unit_vector` is the one validation of an axis or steering vector: shape, finiteness, a direction.

**Capping.** The paper (its ``steering.py``) caps along a unit vector ``v`` with threshold ``t``:
``h <- h - max(0, <h, v> - t) * v``, a *ceiling* on the projection on ``v``. It caps along
``v = -axis``, so in terms of the Assistant Axis ``a`` (unit, pointing towards the default
Assistant) this is a *floor*: with ``tau = -t``,

    ``h <- h + max(0, tau - <h, a>) * a``

which leaves an activation whose projection on ``a`` is already at least ``tau`` untouched and
lifts any other exactly onto ``<h, a> = tau``, changing nothing orthogonal to ``a``. This module
uses the floor form, with ``a`` the axis and ``tau`` the 25th percentile of the default persona's
projections (:func:`capping_thresholds`).

**Hook order.** PyTorch runs the forward hooks of one module in the order they were registered.
A :class:`ProjectionProbe` entered *inside* an :func:`intervene` block registers after the
intervention's hooks, so at a layer both touch it reads the *modified* output; a probe entered
*before* the intervention reads the unmodified output at that layer (the intervention's effect still
shows at every later layer). :func:`intervene` warns when it lands on a layer an active probe
already watches.

**Compatibility.** A decoder block returns a tuple whose first element is the hidden state in
transformers 4.x and a plain tensor in 5.x; the hooks accept and return both forms. Vectors are
cast to the hidden state's dtype and device at hook time (so bf16 models and ``device_map="auto"``
models whose layers live on several GPUs work); projections are computed in float32.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from utils.activations import check_vector, decoder_layers

__all__ = [
    "CapStats",
    "ProjectionProbe",
    "cap_activations",
    "capping",
    "capping_thresholds",
    "intervene",
    "is_generated_pass",
    "pass_positions",
    "steer_positions",
    "steering",
]

Positions = Literal["all", "generated", "prompt", "response"]
_POSITIONS = ("all", "generated", "prompt", "response")
LAYER_CONVENTION = "layer l = output of model.model.layers[l] = hidden_states[l + 1]"


# ---------------------------------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------------------------------

def _cap(h: Float[Tensor, "... d_model"], unit_axis: Float[Tensor, " d_model"], tau: float,
         ) -> tuple[Float[Tensor, "... d_model"], Bool[Tensor, "..."]]:
    """:func:`cap_activations` without input checks; also returns the mask of capped positions."""
    a = unit_axis.to(device=h.device, dtype=torch.float32)
    hf = h.float()
    proj = hf @ a  # [...], float32
    below = proj < tau
    lifted = (hf + (tau - proj).unsqueeze(-1) * a).to(h.dtype)
    # torch.where, not h + 0 * a: positions at or above tau keep their exact bits.
    return torch.where(below.unsqueeze(-1), lifted, h), below


def cap_activations(h: Float[Tensor, "... d_model"], unit_axis: Float[Tensor, " d_model"], tau: float,
                    ) -> Float[Tensor, "... d_model"]:
    """Floor the projection of every activation on a unit axis at ``tau``.

    ``h + max(0, tau - <h, a>) * a`` at every position: an activation with ``<h, a> >= tau`` is
    returned unchanged, bit for bit; one below is moved along ``a`` only, onto ``<h, a> = tau``
    (exactly in float32 arithmetic up to rounding; in bf16 the result is rounded back to bf16, so the
    new projection is ``tau`` only to bf16 precision). The projection and the shift are computed in
    float32 and the result has ``h``'s dtype and device. Positions whose projection is NaN are left
    unchanged.

    Args:
        h: activations, any leading shape, ``[..., d_model]``.
        unit_axis: ``[d_model]``, unit norm (normalise it first: ``axis / axis.norm()``).
        tau: the floor on ``<h, a>``.

    Returns:
        ``[..., d_model]``, same dtype and device as ``h``.

    Raises:
        ValueError: a wrong shape, an axis that is not unit norm, a non-finite ``tau``.
    """
    if not isinstance(h, Tensor) or not isinstance(unit_axis, Tensor):
        raise TypeError("cap_activations takes torch tensors: h [..., d_model] and unit_axis [d_model].")
    if unit_axis.ndim != 1 or h.ndim < 1 or h.shape[-1] != unit_axis.shape[0]:
        raise ValueError(f"Shapes do not match: h is {tuple(h.shape)} and unit_axis {tuple(unit_axis.shape)}; "
                         "unit_axis must be [d_model] with d_model = h.shape[-1].")
    norm = float(unit_axis.float().norm())
    if not math.isfinite(norm) or abs(norm - 1.0) > 1e-3:
        raise ValueError(f"unit_axis has norm {norm:.6g}, not 1: pass axis / axis.norm().")
    tau = _finite_float(tau, "tau")
    return _cap(h, unit_axis, tau)[0]


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------

class CapStats:
    """Counts, per capped layer, of the positions the cap looked at and of those it changed.

    Pass one to :func:`capping` (or :func:`intervene`) and read it after (or during) the block.
    A position is one token of one sequence in one forward pass. Padding positions (where the
    forward pass's 2D ``attention_mask`` is 0) are not counted, though the formula is applied to them
    too; with ``positions="generated"`` only the positions of generated passes are counted. Counts
    accumulate over every use of the same object.
    """

    def __init__(self) -> None:
        self._seen: dict[int, Tensor | int] = {}
        self._capped: dict[int, Tensor | int] = {}

    def _record(self, layer: int, capped: Bool[Tensor, "batch seq"], real: Bool[Tensor, "batch seq"] | None) -> None:
        if real is None:
            seen, hit = capped.numel(), capped.sum()
        else:
            real = real.to(capped.device)
            seen, hit = real.sum(), (capped & real).sum()
        # Kept as (device) tensors so counting adds no GPU synchronisation; read as ints below.
        self._seen[layer] = self._seen.get(layer, 0) + seen
        self._capped[layer] = self._capped.get(layer, 0) + hit

    @property
    def layers(self) -> list[int]:
        """The layers seen so far, sorted."""
        return sorted(self._seen)

    def seen(self, layer: int | None = None) -> int:
        """Positions the cap looked at, at ``layer`` or summed over layers."""
        keys = self.layers if layer is None else [self._check(layer)]
        return sum(int(self._seen[k]) for k in keys)

    def capped(self, layer: int | None = None) -> int:
        """Positions the cap changed, at ``layer`` or summed over layers."""
        keys = self.layers if layer is None else [self._check(layer)]
        return sum(int(self._capped[k]) for k in keys)

    def fraction_capped(self, layer: int | None = None) -> float:
        """``capped / seen`` at ``layer``, or over all layers together; raises if nothing was seen."""
        seen = self.seen(layer)
        if seen == 0:
            raise ValueError("CapStats has seen no positions yet: run a forward pass or generate inside "
                             "`capping(..., stats=stats)` first.")
        return self.capped(layer) / seen

    def per_layer(self) -> dict[int, float]:
        """``{layer: fraction capped}`` for every layer seen."""
        return {layer: self.fraction_capped(layer) for layer in self.layers}

    def reset(self) -> None:
        self._seen.clear()
        self._capped.clear()

    def _check(self, layer: int) -> int:
        if layer not in self._seen:
            raise KeyError(f"CapStats has no counts for layer {layer}; layers seen: {self.layers}.")
        return layer

    def __repr__(self) -> str:
        if not self._seen:
            return "CapStats(nothing seen yet)"
        body = ", ".join(f"{k}: {self.capped(k)}/{self.seen(k)}" for k in self.layers)
        return f"CapStats(capped/seen per layer: {body})"


# ---------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------

def _finite_float(x, what: str) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number; got {x!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: it must be finite.")
    return value


def _check_layer(layer, n_layers: int, what: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{what}: layer keys must be ints; got {layer!r} ({type(layer).__name__}).")
    if not 0 <= layer < n_layers:
        raise ValueError(f"{what}: layer {layer} is out of range; this model has {n_layers} blocks, so use "
                         f"0..{n_layers - 1} ({LAYER_CONVENTION}).")
    return layer


def _d_model(model) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if d is None:
        raise TypeError(f"{type(model).__name__} has no config.hidden_size; pass a *ForCausalLM model.")
    return int(d)


class _DeviceCache:
    """A vector cast to each (device, dtype) it is used with, computed once per combination."""

    def __init__(self, vector: Tensor):
        self.vector = vector
        self._copies: dict[tuple, Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._copies:
            self._copies[key] = self.vector.to(device=device, dtype=dtype)
        return self._copies[key]


# Probes currently registered, as (model id, layer) -> count, so intervene() can warn about hook order.
_ACTIVE_PROBES: dict[tuple[int, int], int] = {}


# ---------------------------------------------------------------------------------------------------
# Which passes are "generated"
# ---------------------------------------------------------------------------------------------------

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # 5.x, 4.57, older 4.x


def is_generated_pass(hidden: Tensor, block_kwargs: dict) -> bool:
    """Whether a block's forward pass is a decode step of KV-cached generation: ``positions="generated"``.

    The one rule, in the exercise and here: a pass is *generated* when it processes a single position per
    sequence (``hidden.shape[1] == 1``) with a KV cache in use. The prompt's pass (several positions) is not.
    A single-token ``model(...)`` call with the default cache counts as generated too.

    Raises:
        ValueError: the pass has no KV cache (``use_cache=False``): no pass could ever count as generated.
    """
    if all(block_kwargs.get(name) is None for name in _CACHE_KWARGS):
        raise ValueError(
            "positions='generated' needs KV-cached generation, but this forward pass has no KV cache "
            "(use_cache=False), so every pass re-reads the whole sequence and none counts as generated. "
            "Generate with use_cache=True (the default), or use positions='all'.")
    return hidden.ndim == 3 and hidden.shape[1] == 1


ALL_POSITIONS = slice(None)
LAST_POSITION = slice(-1, None)


def pass_positions(hidden: Tensor, block_kwargs: dict, positions: Positions) -> slice | None:
    """Which positions of this forward pass a ``positions`` mode changes: every one, the last one, or none.

    The rules (one implementation: :func:`intervene` uses it, and Part 3's exercise writes the same):

    - ``"all"``: every position of every pass;
    - ``"generated"``: every position of a decode step (a pass with a single position per sequence,
      :func:`is_generated_pass`), nothing in the prompt's pass;
    - ``"prompt"``: every position of a pass with more than one position (the prompt's pass of KV-cached
      generation), nothing in the decode steps (the Persona Vectors code's ``"prompt"``);
    - ``"response"``: the last position of every pass: in the prompt's pass its last token (whose prediction is
      the answer's first token), then each new token (the Persona Vectors code's ``"response"``, its default).
      With left padding (what :func:`utils.generation.generate` does) the last column is every row's last token.

    Returns:
        ``ALL_POSITIONS`` (``slice(None)``), ``LAST_POSITION`` (``slice(-1, None)``) or None (leave the pass alone).

    Raises:
        ValueError: an unknown mode; a mode other than ``"all"`` on a pass with no KV cache (``use_cache=False``),
            where every pass re-reads the whole sequence, so "the prompt's pass" and "a decode step" do not exist.
    """
    if positions == "all":
        return ALL_POSITIONS
    if positions not in _POSITIONS:
        raise ValueError(f"positions must be one of {_POSITIONS}; got {positions!r}.")
    if positions == "generated":
        return ALL_POSITIONS if is_generated_pass(hidden, block_kwargs) else None
    if all(block_kwargs.get(name) is None for name in _CACHE_KWARGS):
        raise ValueError(
            f"positions={positions!r} is defined for KV-cached generation, but this forward pass has no KV cache "
            "(use_cache=False): every pass re-reads the whole sequence. Generate with use_cache=True (the default), "
            "or use positions='all'.")
    single = hidden.ndim == 3 and hidden.shape[1] == 1
    if positions == "prompt":
        return None if single else ALL_POSITIONS
    return LAST_POSITION


_WITH_CACHE = {"past_key_values": True}  # what pass_positions sees for a pass of KV-cached generation


def steer_positions(h: Float[Tensor, "batch seq d_model"], vector: Float[Tensor, " d_model"],
                    positions: Positions) -> Float[Tensor, "batch seq d_model"]:
    """One pass's block output ``h`` with ``vector`` added where ``positions`` says (:func:`pass_positions`'
    rules for a pass of KV-cached generation); a new tensor in ``h``'s dtype and device, ``h`` unchanged.

    ``"all"``: every position; ``"prompt"``: every position when ``seq > 1``, none when ``seq == 1``;
    ``"response"``: the last position only; ``"generated"``: every position when ``seq == 1``, none otherwise.
    """
    if h.ndim != 3:
        raise ValueError(f"h must be [batch, seq, d_model]; got shape {tuple(h.shape)}.")
    where = pass_positions(h, _WITH_CACHE, positions)
    if where is None:
        return h.clone()
    v = vector.to(device=h.device, dtype=h.dtype)
    if where == ALL_POSITIONS:
        return h + v
    return torch.cat([h[:, :-1], h[:, -1:] + v], dim=1)


class _PassState:
    """The current pass's 2D attention mask, read by the decoder's forward pre-hook (for :class:`CapStats`)."""

    def __init__(self) -> None:
        self.attention_mask: Tensor | None = None  # 2D [batch, keys] or None

    def pre_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        return None

    def real_positions(self, seq: int) -> Bool[Tensor, "batch seq"] | None:
        """The non-padding positions of this pass (the last ``seq`` columns of the 2D mask), if known."""
        mask = self.attention_mask
        if mask is None or mask.shape[-1] < seq:
            return None
        return mask[:, -seq:].bool()


# ---------------------------------------------------------------------------------------------------
# The context managers
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def intervene(
    model,
    *,
    add: Mapping[int, Float[Tensor, " d_model"]] | None = None,
    cap: Mapping[int, tuple[Float[Tensor, " d_model"], float]] | None = None,
    positions: Positions = "all",
    stats: CapStats | None = None,
) -> Iterator[None]:
    """Change block outputs during every forward pass inside the ``with`` block.

    Args:
        model: a decoder-only ``*ForCausalLM`` (blocks at ``model.model.layers``), any dtype, on one
            device or spread with ``device_map="auto"``.
        add: ``{layer: vector}``; ``vector`` (``[d_model]``, already scaled by the caller, e.g.
            ``-10 * axis[layer]``) is added to block ``layer``'s output at every position.
        cap: ``{layer: (axis, tau)}``; block ``layer``'s output is capped with
            ``h <- h + max(0, tau - <h, a>) * a``, ``a = axis / |axis|`` (normalised here), i.e. its
            projection on the unit axis is floored at ``tau`` (see :func:`cap_activations`).
            A layer in both ``add`` and ``cap`` gets the addition first, then the cap.
        positions: which forward passes are changed.

            - ``"all"``: every position of every forward pass (prompt and generated tokens alike;
              the paper's setting).
            - ``"generated"``: only the decode steps of KV-cached generation, by :func:`is_generated_pass`'s
              rule: passes that process a single position per sequence with a KV cache in use. The
              prompt's pass (several positions) is left unchanged, so the prompt's positions and the
              cached keys/values computed from them are the unmodified model's. The first generated
              token is sampled from the prompt pass's (unchanged) logits; the change starts with the
              forward pass that reads it. A pass with no KV cache (``use_cache=False``) raises ValueError.
            - ``"prompt"``: only the prompt's pass (more than one position), every position of it.
            - ``"response"``: the last position of every pass (the prompt's last token, then each new token).

            :func:`pass_positions` states the rules; ``"prompt"`` and ``"response"`` need a KV cache too.
        stats: a :class:`CapStats` that counts, per capped layer, positions seen and positions capped.

    Hooks: one forward hook per touched block, plus (for ``stats``) one forward pre-hook on ``model.model``; all are removed in ``finally``, whatever happens in the block.
    The hooks run in the order they are registered, so a :class:`ProjectionProbe` entered inside this
    block sees the changed output.

    Raises:
        ValueError: a layer out of range or not an int, a vector of the wrong shape or with NaN/inf,
            a zero capping axis, a non-finite tau, an unknown ``positions``, nothing to do,
            ``stats`` without ``cap``.
    """
    if positions not in _POSITIONS:
        raise ValueError(f"positions must be one of {_POSITIONS}; got {positions!r}.")
    add = dict(add or {})
    cap = dict(cap or {})
    if not add and not cap:
        raise ValueError("intervene() got nothing to do: pass add={layer: vector} and/or "
                         "cap={layer: (axis, tau)} with at least one layer.")
    if stats is not None and not isinstance(stats, CapStats):
        raise ValueError(f"stats must be a CapStats (or None); got {type(stats).__name__}.")
    if stats is not None and not cap:
        raise ValueError("stats counts capped positions, but no layer is capped: pass cap=... or drop stats.")
    blocks = decoder_layers(model)
    n_layers, d_model = len(blocks), _d_model(model)

    adds: dict[int, _DeviceCache] = {}
    for layer, vector in add.items():
        _check_layer(layer, n_layers, "add")
        adds[layer] = _DeviceCache(check_vector(vector, d_model, f"add[{layer}]"))
    caps: dict[int, tuple[_DeviceCache, float]] = {}
    for layer, pair in cap.items():
        _check_layer(layer, n_layers, "cap")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"cap[{layer}] must be a pair (axis, tau); got {type(pair).__name__}.")
        axis = check_vector(pair[0], d_model, f"cap[{layer}] axis").float()
        norm = float(axis.norm())
        if norm == 0.0:
            raise ValueError(f"cap[{layer}] axis is all zeros; it has no direction to cap along.")
        caps[layer] = (_DeviceCache(axis / norm), _finite_float(pair[1], f"cap[{layer}] tau"))

    for layer in sorted(set(adds) | set(caps)):
        if _ACTIVE_PROBES.get((id(model), layer)):
            warnings.warn(f"A ProjectionProbe registered earlier watches layer {layer}: it reads that block's "
                          "output BEFORE this intervention. Enter the probe inside the intervention's `with` "
                          "block to read the changed output.", stacklevel=3)

    state = _PassState()

    def make_hook(layer: int):
        vector = adds.get(layer)
        capping_here = caps.get(layer)

        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, tuple) else output  # 4.x: tuple; 5.x: tensor
            where = pass_positions(h, kwargs, positions)
            if where is None:
                return None
            target = h if where == ALL_POSITIONS else h[:, where]
            new = target
            if vector is not None:
                new = new + vector.get(h.device, h.dtype)
            if capping_here is not None:
                axis, tau = capping_here
                new, below = _cap(new, axis.get(h.device, torch.float32), tau)
                if stats is not None:
                    if below.ndim == 2:  # [batch, seq]: padding known from the pass's attention mask
                        stats._record(layer, below, state.real_positions(below.shape[-1]))
                    else:
                        stats._record(layer, below.reshape(1, -1), None)
            if where != ALL_POSITIONS:  # "response": the earlier positions keep their exact values
                new = torch.cat([h[:, :-1], new], dim=1)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = []
    try:
        if stats is not None:
            handles.append(model.model.register_forward_pre_hook(state.pre_hook, with_kwargs=True))
        for layer in sorted(set(adds) | set(caps)):
            handles.append(blocks[layer].register_forward_hook(make_hook(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def steering(model, vectors: Mapping[int, Float[Tensor, " d_model"]], positions: Positions = "all") -> Iterator[None]:
    """Add ``vectors[layer]`` (already scaled) to block ``layer``'s output: ``intervene(model, add=vectors)``."""
    with intervene(model, add=vectors, positions=positions):
        yield


@contextlib.contextmanager
def capping(
    model,
    axes: Mapping[int, Float[Tensor, " d_model"]],
    thresholds: Mapping[int, float],
    positions: Positions = "all",
    stats: CapStats | None = None,
) -> Iterator[None]:
    """Floor the projection on ``axes[layer]`` (normalised here) at ``thresholds[layer]``, per layer.

    ``intervene(model, cap={l: (axes[l], thresholds[l])})``; ``axes`` and ``thresholds`` must have
    the same layers. See :func:`intervene` for ``positions`` and ``stats``.
    """
    if set(axes) != set(thresholds):
        missing = sorted(set(axes) ^ set(thresholds), key=str)
        raise ValueError(f"axes and thresholds must have the same layers; these are in only one of them: {missing}.")
    with intervene(model, cap={layer: (axes[layer], thresholds[layer]) for layer in axes}, positions=positions,
                   stats=stats):
        yield


class ProjectionProbe:
    """Record ``<h, a>`` (``a`` the unit axis) of block outputs at every position of every forward pass.

    Use as a context manager; hooks are registered on entry and removed on exit (also on errors)::

        with capping(model, axes, taus), ProjectionProbe(model, {l: axis[l] for l in layers}) as probe:
            model.generate(...)
        probe.projections[l]        # list of [batch, seq] float32 CPU tensors, one per forward pass
        probe.cat(l)                # [batch, total positions] when every pass had the same batch

    **Registration order.** The probe's hooks are registered on entry, after any intervention already
    active, and PyTorch runs a module's forward hooks in registration order: a probe entered inside
    (after) :func:`capping`/:func:`steering` reads the *changed* output of a capped/steered layer. A probe
    entered before the intervention reads that layer's output *before* the change.

    Args:
        model: a decoder-only ``*ForCausalLM``.
        layers: ``{layer: axis}`` with ``axis`` ``[d_model]`` (normalised here).
    """

    def __init__(self, model, layers: Mapping[int, Float[Tensor, " d_model"]]):
        blocks = decoder_layers(model)
        n_layers, d_model = len(blocks), _d_model(model)
        if not layers:
            raise ValueError("ProjectionProbe needs at least one {layer: axis} to watch.")
        self._model, self._blocks = model, blocks
        self._axes: dict[int, _DeviceCache] = {}
        for layer, axis in layers.items():
            _check_layer(layer, n_layers, "ProjectionProbe")
            axis = check_vector(axis, d_model, f"ProjectionProbe axis for layer {layer}").float()
            if float(axis.norm()) == 0.0:
                raise ValueError(f"ProjectionProbe axis for layer {layer} is all zeros.")
            self._axes[layer] = _DeviceCache(axis / axis.norm())
        self.projections: dict[int, list[Float[Tensor, "batch seq"]]] = {layer: [] for layer in self._axes}
        self._handles: list = []

    def _hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            a = self._axes[layer].get(h.device, torch.float32)
            self.projections[layer].append((h.float() @ a).cpu())
            return None
        return hook

    def __enter__(self) -> ProjectionProbe:
        if self._handles:
            raise RuntimeError("This ProjectionProbe is already active; make a new one to nest.")
        try:
            for layer in self._axes:
                self._handles.append(self._blocks[layer].register_forward_hook(self._hook(layer)))
                key = (id(self._model), layer)
                _ACTIVE_PROBES[key] = _ACTIVE_PROBES.get(key, 0) + 1
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in list(self._axes)[:len(self._handles)]:
            key = (id(self._model), layer)
            _ACTIVE_PROBES[key] -= 1
            if not _ACTIVE_PROBES[key]:
                del _ACTIVE_PROBES[key]
        self._handles = []

    def cat(self, layer: int) -> Float[Tensor, "batch positions"]:
        """All recorded passes at ``layer`` joined along positions (e.g. prompt then each generated token)."""
        passes = self.projections[layer]
        if not passes:
            raise ValueError(f"Nothing recorded at layer {layer}: run the model inside the probe's `with` block.")
        if len({p.shape[0] for p in passes}) != 1:
            raise ValueError("The recorded passes have different batch sizes; read probe.projections[layer] instead.")
        return torch.cat(passes, dim=-1)


# ---------------------------------------------------------------------------------------------------
# Thresholds and layer ranges
# ---------------------------------------------------------------------------------------------------

def capping_thresholds(projections: Mapping[int, Float[Tensor, " n_responses"]], percentile: float = 25.0,
                       ) -> dict[int, float]:
    """The paper's capping thresholds: per layer, a percentile of the default persona's projections.

    Args:
        projections: ``{layer: [n_responses]}``, each default-persona response's mean activation at
            that layer projected on the unit axis.
        percentile: in (0, 100); the paper's ``p0.25`` is 25.

    Returns:
        ``{layer: tau}`` (``torch.quantile`` with linear interpolation, as ``numpy.percentile``).
    """
    p = _finite_float(percentile, "percentile")
    if not 0.0 < p < 100.0:
        raise ValueError(f"percentile must be in (0, 100) (the paper uses 25); got {percentile}.")
    if not projections:
        raise ValueError("projections is empty: give {layer: [n_responses] tensor} for at least one layer.")
    out = {}
    for layer, values in projections.items():
        if not isinstance(values, Tensor):
            values = torch.as_tensor(values)
        values = values.detach().float().reshape(-1).cpu()
        if values.numel() == 0:
            raise ValueError(f"projections[{layer}] is empty: the threshold needs at least one response.")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"projections[{layer}] has NaN or infinite values.")
        out[layer] = float(torch.quantile(values, p / 100.0))
    return out
