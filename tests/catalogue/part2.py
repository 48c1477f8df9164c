"""Part 2's catalogue: realistic mistakes and alternative correct answers for every check.

Mistakes are small wrong implementations; variants are independent correct implementations that never
call the reference solution.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tests.catalogue import Entry, Mistake, Variant


class TranscriptError(ValueError):
    pass


# ==================================================================================================
# Exercise 1: parse_transcript
# ==================================================================================================

def _parse_with(*, name_file=True, name_turn=True, one_based=False, strip_check=True, strip_content=False,
                check_alternation=True, keep_system=True, check_role=True, whole=False, key_error=False,
                as_path=True, order="alternate", content_check="str", keep_keys=False):
    def parse(path):
        path = Path(path) if as_path else path
        data = json.loads(path.read_text())
        if whole:
            return data
        conv = data["conversation"]
        out, expected, previous = [], "user", None
        for i, m in enumerate(conv):
            where = (f"{path}: " if name_file else "") + (f"turn {i + one_based}" if name_turn else "a turn")
            if key_error:
                role = m["role"]
            elif check_role and "role" not in m:
                raise TranscriptError(f"{where} has no role")
            role = m.get("role")
            content = m.get("content")
            if content_check == "str" and not isinstance(content, str):
                raise TranscriptError(f"{where}: content is not a string")
            if content_check == "truthy":
                empty = not content or not str(content).strip()
            else:
                empty = not content.strip() if strip_check else not content
            if empty:
                raise TranscriptError(f"{where}: empty content")
            if order == "no_repeat":  # only "no two in a row"
                if role == previous:
                    raise TranscriptError(f"{where}: two {role} turns in a row")
            elif order == "system_anywhere" and role == "system":
                pass
            elif order == "users_only" and role == "user" and previous == "user":
                raise TranscriptError(f"{where}: two user turns in a row")
            elif order == "users_only":
                pass
            elif role == "system" and i == 0:
                if not keep_system:
                    continue
            elif check_alternation:
                if role != expected:
                    raise TranscriptError(f"{where}: expected {expected}, got {role}")
                expected = "assistant" if role == "user" else "user"
            previous = role
            out.append(dict(m) if keep_keys else
                       {"role": role, "content": content.strip() if strip_content else content})
        return out
    return parse


def parse_pairwise(path):
    """Validates with itertools.pairwise over the roles."""
    import itertools

    path = Path(path)
    conv = json.loads(path.read_text(encoding="utf-8"))["conversation"]
    for i, m in enumerate(conv):
        if "role" not in m:
            raise TranscriptError(f"Message {i} in {path.name} lacks a role")
        if not isinstance(m.get("content"), str) or m["content"].strip() == "":
            raise TranscriptError(f"Message {i} in {path.name} is empty")
    body_start = 1 if conv and conv[0]["role"] == "system" else 0
    if body_start < len(conv) and conv[body_start]["role"] != "user":
        raise TranscriptError(f"{path.name}, message {body_start}: must start with the user")
    for i, (a, b) in enumerate(itertools.pairwise(conv[body_start:]), start=body_start + 1):
        if a["role"] == b["role"] or b["role"] not in ("user", "assistant"):
            raise TranscriptError(f"{path.name}, message {i}: {a['role']} then {b['role']}")
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def parse_expected_roles(path):
    """Compares each role with the role the position requires."""
    text = open(path, encoding="utf-8").read()
    conv = json.loads(text)["conversation"]
    offset = 1 if conv and conv[0].get("role") == "system" else 0
    result = []
    for idx, msg in enumerate(conv):
        want = "system" if idx < offset else ("user", "assistant")[(idx - offset) % 2]
        if msg.get("role") != want:
            raise TranscriptError(f"{path} message #{idx}: role {msg.get('role')!r}, expected {want!r}")
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            raise TranscriptError(f"{path} message #{idx}: no content, or content that is not text")
        result.append({"role": msg["role"], "content": msg["content"]})
    return result


def parse_dataclass(path):
    """Builds dataclasses, validates in __post_init__, converts back to dicts."""
    from dataclasses import asdict, dataclass

    @dataclass
    class Msg:
        role: str
        content: str

    path = Path(path)
    conv = json.loads(path.read_bytes())["conversation"]
    msgs = []
    prev = None
    for n, raw in enumerate(conv):
        try:
            msg = Msg(raw["role"], raw["content"])
        except KeyError as exc:
            raise TranscriptError(f"{path} (turn {n}): missing {exc}") from None
        if not isinstance(msg.content, str) or not msg.content.strip():
            raise TranscriptError(f"{path} (turn {n}): empty")
        if msg.role not in ("system", "user", "assistant"):
            raise TranscriptError(f"{path} (turn {n}): unknown role {msg.role!r}")
        if msg.role == "system":
            if n:
                raise TranscriptError(f"{path} (turn {n}): system not first")
        elif (prev in (None, "system") and msg.role != "user") or msg.role == prev:
            raise TranscriptError(f"{path} (turn {n}): bad order")
        prev = msg.role
        msgs.append(asdict(msg))
    return msgs


def _parse_mistakes():
    return (
        Mistake("the error does not name the file", _parse_with(name_file=False), "does not name the file"),
        Mistake("the error does not name the turn", _parse_with(name_turn=False), "does not name the turn"),
        Mistake("turns counted from 1", _parse_with(one_based=True), "count turns from 0"),
        Mistake("whitespace-only content accepted", _parse_with(strip_check=False), "only whitespace"),
        Mistake("no alternation check", _parse_with(check_alternation=False), "two user turns in a row"),
        Mistake("content stripped", _parse_with(strip_content=True), "exactly as in the file"),
        Mistake("system message dropped", _parse_with(keep_system=False), "dropped the system message"),
        Mistake("returns the whole JSON object", _parse_with(whole=True), "whole JSON object"),
        Mistake("a missing role raises KeyError", _parse_with(key_error=True), "KeyError"),
        Mistake("a str path not accepted (path.read_text() on the str)", _parse_with(as_path=False), "Path(path)"),
        Mistake("only 'no two turns in a row' checked", _parse_with(order="no_repeat"),
                "must start with a user turn"),
        Mistake("a system message accepted anywhere", _parse_with(order="system_anywhere"),
                "a system message may only come first"),
        Mistake("only two user turns in a row caught", _parse_with(order="users_only"),
                "two assistant turns in a row"),
        Mistake("content not checked to be a string", _parse_with(content_check="truthy"), "not a string"),
        Mistake("a missing content crashes (None.strip())", _parse_with(content_check=None), "AttributeError"),
        Mistake("keys beyond role and content kept", _parse_with(keep_keys=True), "turn_id"),
    )


# ==================================================================================================
# Exercise 2: turn_projections
# ==================================================================================================

def _turn_with(*, index_shift=None, normalise=True, windows=True, end_extra=0, per_turn_passes=False, dtype=None,
               sign=1.0, cast=True):
    """Per-turn projections with one thing wrong; ``index_shift`` reads ``hidden_states[layer + index_shift]`` (1: the
    block's output below the last block), None the block's output through a hook."""
    def turn_projections(model, tokenizer, messages, axis, layer, max_tokens=8192):
        from utils.conversation import turn_windows

        unit = axis.float() / axis.float().norm() if normalise else axis.float()
        ws = turn_windows(messages, tokenizer, max_tokens if windows else 10**9)
        out = torch.zeros(sum(len(w.turns) for w in ws))
        for w in ws:
            jobs = [(w.turns[k:k + 1], w.spans[k:k + 1]) for k in range(len(w.turns))] if per_turn_passes \
                else [(w.turns, w.spans)]
            for turns, spans in jobs:
                ids = torch.tensor([w.ids])
                if index_shift is None:
                    grabbed = []
                    handle = model.model.layers[layer].register_forward_hook(
                        lambda m, a, o, grabbed=grabbed: grabbed.append(o[0] if isinstance(o, tuple) else o))
                    try:
                        model(input_ids=ids)
                    finally:
                        handle.remove()
                    hidden = grabbed[0][0]
                else:
                    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + index_shift][0]
                for t, (s, e) in zip(turns, spans):
                    h = hidden[s:e + end_extra]
                    if cast == "never":  # the model's dtype throughout: the axis cast to it
                        out[t] = sign * (h.mean(0) @ unit.to(h.dtype))
                        continue
                    if cast == "after_mean":
                        out[t] = sign * (h.mean(0).float() @ unit)
                        continue
                    h = h.to(dtype) if dtype is not None else h.float()
                    out[t] = sign * (h.mean(0).float() @ unit)
        return out
    return turn_projections


def turns_hooks(model, tokenizer, messages, axis, layer, max_tokens=8192):
    """A forward hook on the block, per window."""
    from utils.conversation import turn_windows

    a = F.normalize(axis.float(), dim=0)
    result = {}
    for w in turn_windows(messages, tokenizer, max_tokens):
        grabbed = []
        handle = model.model.layers[layer].register_forward_hook(
            lambda mod, args, out, grabbed=grabbed: grabbed.append((out[0] if isinstance(out, tuple) else out).detach()))
        try:
            model(input_ids=torch.tensor([w.ids]))
        finally:
            handle.remove()
        for t, (s, e) in zip(w.turns, w.spans):
            result[t] = float(grabbed[0][0, s:e].double().mean(0) @ a.double())
    return torch.tensor([result[t] for t in sorted(result)], dtype=torch.float32)


def turns_hidden_states(model, tokenizer, messages, axis, layer, max_tokens=8192):
    """output_hidden_states below the last block, a hook at the last (whose hidden_states entry is normed)."""
    from utils.conversation import turn_windows

    a = axis.float() / axis.float().norm()
    last = layer == len(model.model.layers) - 1
    out = []
    for w in turn_windows(messages, tokenizer, max_tokens):
        ids = torch.tensor([w.ids[:w.spans[-1][1]]])
        if last:
            grabbed = []
            handle = model.model.layers[layer].register_forward_hook(
                lambda m, args, o, grabbed=grabbed: grabbed.append(o[0] if isinstance(o, tuple) else o))
            try:
                model(input_ids=ids)
            finally:
                handle.remove()
            h = grabbed[0][0]
        else:
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        out += [float(h[s:e].float().mean(0) @ a) for s, e in w.spans]
    return torch.tensor(out, dtype=torch.float32)


def turns_utils_activations(model, tokenizer, messages, axis, layer, max_tokens=8192):
    """The course's per-turn mean activations, then a projection."""
    from utils.activations import per_turn_mean_activations

    means = per_turn_mean_activations(model, tokenizer, messages, [layer], max_tokens=max_tokens)[:, 0]
    return (means @ (axis / axis.norm())).float()


def turns_numpy(model, tokenizer, messages, axis, layer, max_tokens=8192):
    """Window ids up to the last span's end, numpy means; hidden_states below the last block, a hook on it (whose
    hidden_states entry has the final norm applied)."""
    from utils.conversation import turn_windows

    unit = (axis / axis.norm()).double().numpy()
    last = layer == len(model.model.layers) - 1
    vals = []
    for w in turn_windows(messages, tokenizer, max_tokens):
        end = w.spans[-1][1]
        grabbed = []
        handle = model.model.layers[layer].register_forward_hook(
            lambda m, a, o, grabbed=grabbed: grabbed.append(o[0] if isinstance(o, tuple) else o)) if last else None
        try:
            hs = model(input_ids=torch.tensor([w.ids[:end]]), output_hidden_states=True).hidden_states
        finally:
            if handle is not None:
                handle.remove()
        h = (grabbed[0] if last else hs[layer + 1])[0].double().numpy()
        vals += [(t, h[s:e].mean(axis=0) @ unit) for t, (s, e) in zip(w.turns, w.spans)]
    return torch.tensor([v for _, v in sorted(vals)], dtype=torch.float32)


def _turn_truncating(model, tokenizer, messages, axis, layer, max_tokens=8192):
    """Keeps the last max_tokens tokens of the conversation (cuts a turn)."""
    from utils.conversation import assistant_turn_spans

    ids, spans = assistant_turn_spans(messages, tokenizer)
    cut = max(0, len(ids) - max_tokens)
    hidden = model(input_ids=torch.tensor([ids[cut:]]), output_hidden_states=True).hidden_states[layer + 1][0]
    unit = axis.float() / axis.norm()
    return torch.stack([hidden[max(s - cut, 0):max(e - cut, 1)].float().mean(0) @ unit for s, e in spans])


def _turn_nan_when_too_long(model, tokenizer, messages, axis, layer, max_tokens=8192):
    """Catches the error for a turn that cannot fit and returns NaN for every turn."""
    n = sum(m["role"] == "assistant" for m in messages)
    try:
        return _turn_with()(model, tokenizer, messages, axis, layer, max_tokens)
    except ValueError:
        return torch.full((n,), float("nan"))


def _turn_mistakes():
    return (
        Mistake("hidden_states[layer] (one layer early)", _turn_with(index_shift=0), "hidden_states[l + 1]"),
        Mistake("the raw axis, not normalised", _turn_with(normalise=False), "divide it by its norm"),
        Mistake("the sign flipped", _turn_with(sign=-1.0), "sign is flipped"),
        Mistake("max_tokens ignored", _turn_with(windows=False), "trailing window of whole turns"),
        Mistake("one pass per turn when the conversation fits", _turn_with(per_turn_passes=True),
                "forward passes"),
        Mistake("mean in bf16", _turn_with(dtype=torch.bfloat16), "float32"),
        Mistake("the end-of-turn token included", _turn_with(end_extra=1), "end-of-turn token"),
        Mistake("the conversation truncated to its last max_tokens tokens", _turn_truncating, "cuts a turn"),
        Mistake("a list of floats, not a tensor", lambda *a, **k: _turn_with()(*a, **k).tolist(), "float32 tensor"),
        Mistake("float64 projections", lambda *a, **k: _turn_with()(*a, **k).double(), "float32 CPU tensor"),
        Mistake("NaN for a turn that cannot fit (the error caught)", _turn_nan_when_too_long, "never cut a turn"),
        Mistake("hidden_states[layer + 1] at the last layer too (the final norm's output)", _turn_with(index_shift=1),
                "final norm", note="the course's reference itself read hidden_states there once",
                stage="the last block too: its output, not hidden_states[-1] (which has the final norm applied)"),
        Mistake("the model's dtype throughout (no float32 cast on a bf16 model)", _turn_with(cast="never"),
                "computed in bf16", stage="on a bf16 model, averaged in float32"),
        Mistake("the mean in the model's dtype, projected in float32", _turn_with(cast="after_mean"),
                "computed in bf16", stage="on a bf16 model, averaged in float32"),
    )


# ==================================================================================================
# Exercise 3: capping_threshold
# ==================================================================================================

def _threshold_np(q=None, method="linear", fixed=None, mutate=False):
    def capping_threshold(projections, percentile=25.0):
        out = {}
        for layer, p in projections.items():
            if mutate:
                p.copy_(p.sort().values)
            pct = fixed if fixed is not None else percentile
            out[layer] = float(np.percentile(p.double().numpy(), pct if q is None else q(pct), method=method))
        return out
    return capping_threshold


def threshold_torch(projections, percentile=25.0):
    return {k: torch.quantile(v.double(), percentile / 100).item() for k, v in projections.items()}


def threshold_manual(projections, percentile=25.0):
    """Linear interpolation on sorted values, by hand."""
    out = {}
    for layer, p in projections.items():
        xs = sorted(p.tolist())
        pos = (len(xs) - 1) * percentile / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[layer] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def threshold_statistics(projections, percentile=25.0):
    """numpy.quantile with a fraction; statistics for one value."""
    return {layer: (float(np.quantile(p.numpy(), percentile / 100)) if len(p) > 1 else statistics.fmean(p.tolist()))
            for layer, p in projections.items()}


def _threshold_mistakes():
    return (
        Mistake("percentile passed as a fraction to numpy.percentile", _threshold_np(q=lambda p: p / 100),
                "numpy.percentile takes 0..100"),
        Mistake("the 75th percentile", _threshold_np(q=lambda p: 100 - p), "LOW end"),
        Mistake("nearest-rank interpolation", _threshold_np(method="lower"), "interpolation"),
        Mistake("percentile argument ignored", _threshold_np(fixed=25.0), "ignored the `percentile`"),
        Mistake("sorted in place", _threshold_np(mutate=True), "changed the projections"),
        Mistake("torch.quantile given 25", lambda projections, percentile=25.0: {
            k: float(torch.quantile(v, percentile)) for k, v in projections.items()}, "fraction in 0..1"),
        Mistake("returns a list", lambda projections, percentile=25.0: [
            float(torch.quantile(v, percentile / 100)) for v in projections.values()], "dict"),
        Mistake("thresholds as 0-d tensors", lambda projections, percentile=25.0: {
            k: torch.quantile(v.float(), percentile / 100) for k, v in projections.items()}, "Python float"),
        Mistake("thresholds as NumPy float32", lambda projections, percentile=25.0: {
            k: np.percentile(v.numpy(), percentile).astype(np.float32) for k, v in projections.items()},
                "Python float"),
    )


# ==================================================================================================
# Exercise 4: drift_summary
# ==================================================================================================

def _drift_with(*, slope="lsq", op="lt", base=0, none=None):
    def drift_summary(projections, threshold):
        y = projections.double().numpy()
        x = np.arange(len(y))
        if slope == "lsq":
            s = float(np.polyfit(x, y, 1)[0])
        elif slope == "ends":
            s = float((y[-1] - y[0]) / (len(y) - 1))
        else:
            s = float(np.polyfit(y, x, 1)[0])
        hits = [i for i, v in enumerate(y) if (v < threshold if op == "lt" else v <= threshold)]
        return s, (hits[0] + base if hits else none)
    return drift_summary


def drift_polyfit(projections, threshold):
    y = projections.numpy().astype(float)
    s = np.polyfit(np.arange(1, len(y) + 1), y, 1)[0]  # turns numbered from 1: the same slope
    below = np.flatnonzero(y < threshold)
    return float(s), (int(below[0]) if below.size else None)


def drift_lstsq(projections, threshold):
    y = projections.double()[:, None]
    X = torch.stack([torch.arange(len(y), dtype=torch.float64), torch.ones(len(y), dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(X, y).solution
    mask = (projections < threshold).tolist()
    return coef[0, 0].item(), (mask.index(True) if True in mask else None)


def drift_scipy(projections, threshold):
    from scipy.stats import linregress

    vals = projections.tolist()
    first = next((i for i, v in enumerate(vals) if v < threshold), None)
    return linregress(range(len(vals)), vals).slope, first


def _drift_mistakes():
    return (
        Mistake("last minus first", _drift_with(slope="ends"), "least-squares line"),
        Mistake("turn regressed on projection", _drift_with(slope="swapped"), "d(projection) / d(turn)"),
        Mistake("<= instead of <", _drift_with(op="le"), "<, not <="),
        Mistake("turns numbered from 1", _drift_with(base=1), "from 0"),
        Mistake("-1 when no turn is below", _drift_with(none=-1), "not -1"),
        Mistake("returns a list", lambda p, t: list(_drift_with()(p, t)), "tuple"),
        Mistake("the slope as a 0-d tensor", lambda p, t: (torch.tensor(_drift_with()(p, t)[0]),
                                                           _drift_with()(p, t)[1]), "Python float"),
        Mistake("first_below as a NumPy integer (np.flatnonzero)",
                lambda p, t: (_drift_with()(p, t)[0], (lambda b: b[0] if b.size else None)(
                    np.flatnonzero(p.numpy() < t))), "Python int"),
    )


# ==================================================================================================
# Exercise 5: add_steering
# ==================================================================================================

def _steering_with(*, pre=False, shift=0, normalise=False, sign=1.0, cast=True, tuple_ok=True, finally_=True,
                   generated="len1", swallow=False, no_cache="raise"):
    @contextlib.contextmanager
    def add_steering(model, layer, vector, positions="all"):
        def hook(module, *hook_args):
            output = hook_args[-1] if not pre else hook_args[0]
            h = output[0] if (isinstance(output, tuple) and tuple_ok) else output
            if positions == "generated" and no_cache == "raise" and not pre and _no_cache(hook_args[1]):
                raise ValueError("positions='generated' needs a KV cache (use_cache=True)")
            if positions == "generated":
                if generated == "len1" and h.shape[1] != 1:
                    return None
                if generated == "last":
                    v = vector.to(h.dtype) if cast else vector
                    new = h.clone()
                    new[:, -1] += v
                    return (new, *output[1:]) if isinstance(output, tuple) and tuple_ok else new
            v = vector / vector.norm() if normalise else vector
            if cast == "dtype":
                v = sign * v.to(h.dtype)
            else:
                v = sign * (v.to(device=h.device, dtype=h.dtype) if cast else v)
            new = h + v
            if pre:
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return (new, *output[1:]) if (isinstance(output, tuple) and tuple_ok) else new

        block = model.model.layers[layer + shift]
        handle = block.register_forward_pre_hook(lambda m, args: hook(m, args)) if pre \
            else block.register_forward_hook(hook, with_kwargs=True)
        if finally_:
            try:
                yield
            except Exception:
                if not swallow:
                    raise
            finally:
                handle.remove()
        else:
            yield
            handle.remove()
    return add_steering


def _no_cache(kwargs) -> bool:
    """No KV cache in a block's keyword arguments (5.x: ``cache``; 4.x: ``past_key_values``)."""
    return kwargs.get("cache") is None and kwargs.get("past_key_values") is None


@contextlib.contextmanager
def steering_in_place(model, layer, vector, positions="all"):
    """Changes the output in place and returns None."""
    def hook(module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        if positions == "generated":
            if _no_cache(kwargs):
                raise ValueError("no KV cache: nothing would count as generated")
            if h.shape[-2] > 1:
                return
        h.add_(vector.to(device=h.device, dtype=h.dtype))

    handle = model.model.layers[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield handle
    finally:
        handle.remove()


class SteeringClass:
    """A class with __enter__/__exit__; detects generated passes from the KV cache on the decoder."""

    def __init__(self, model, layer, vector, positions="all"):
        self.model, self.layer, self.vector, self.positions = model, layer, vector, positions
        self.handles, self.decode = [], False

    def __enter__(self):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
            if self.positions == "generated" and cache is None:
                raise ValueError("positions='generated' needs use_cache=True")
            if self.positions == "generated" and hidden.shape[1] > 1:
                return None
            if isinstance(output, tuple):
                return (output[0] + self.vector.to(output[0]),) + output[1:]
            return output + self.vector.to(output)

        self.handles.append(self.model.model.layers[self.layer].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


@contextlib.contextmanager
def steering_exitstack(model, layer, vector, positions="all"):
    """contextlib.ExitStack with a callback."""
    with contextlib.ExitStack() as stack:
        def hook(module, args, kw, out):
            hidden = out[0] if type(out) is tuple else out
            if positions == "generated" and kw.get("cache", kw.get("past_key_values")) is None:
                raise ValueError("generated positions need a KV cache")
            if positions == "generated" and hidden.size(1) != 1:
                return out
            moved = hidden + vector.type_as(hidden)
            return (moved,) + tuple(out[1:]) if type(out) is tuple else moved
        stack.callback(model.model.layers[layer].register_forward_hook(hook, with_kwargs=True).remove)
        yield


def _steering_generator(model, layer, vector, positions="all"):
    """The reference's generator, without @contextlib.contextmanager."""
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: (o[0] + vector.to(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else o + vector.to(o))
    try:
        yield
    finally:
        handle.remove()


def _steering_mistakes():
    return (
        Mistake("a generator without @contextlib.contextmanager", _steering_generator, "not a context manager"),
        Mistake("a pre-hook (changes the block's input)", _steering_with(pre=True), "INPUT"),
        Mistake("the next layer", _steering_with(shift=1), f"layer {3}"),
        Mistake("the vector normalised again", _steering_with(normalise=True), "normalised the vector"),
        Mistake("the vector subtracted", _steering_with(sign=-1.0), "subtracted"),
        Mistake("no cast to the hidden state's dtype", _steering_with(cast=False), "dtype", stage="any dtype: the vector cast to the hidden state's (a bf16 model stays bf16)"),
        Mistake("cast to the dtype but not moved to the hidden state's device", _steering_with(cast="dtype"),
                "device_map"),
        Mistake("tuple outputs not handled", _steering_with(tuple_ok=False), "tuple"),
        Mistake("no finally: hook left on an exception", _steering_with(finally_=False), "after an exception"),
        Mistake("the exception swallowed", _steering_with(swallow=True), "swallowed"),
        Mistake("generated = all positions", _steering_with(generated="all"), "prompt's positions too"),
        Mistake("generated = the last position of every pass", _steering_with(generated="last"), "prefill"),
        Mistake("no KV cache not refused: generated steers nothing, in silence", _steering_with(no_cache="ignore"),
                "use_cache=False"),
    )


# ==================================================================================================
# Exercise 6: steering_vectors
# ==================================================================================================

def _vectors_with(spread, normalise=True):
    def steering_vectors(axis, projections, multiples):
        unit = axis.float() / axis.float().norm() if normalise else axis.float()
        return torch.stack([m * spread(projections.float()) * unit for m in multiples])
    return steering_vectors


def vectors_numpy(axis, projections, multiples):
    a = axis.double().numpy()
    sd = np.std(projections.double().numpy(), ddof=1)
    return torch.from_numpy(np.outer(np.asarray(multiples, dtype=float), a / np.linalg.norm(a)) * sd).float()


def vectors_einsum(axis, projections, multiples):
    unit = F.normalize(axis.float(), dim=0)
    coeffs = torch.tensor(multiples, dtype=torch.float32) * torch.std(projections.float(), correction=1)
    return torch.einsum("m,d->md", coeffs, unit)


def vectors_statistics(axis, projections, multiples):
    sd = statistics.stdev(projections.tolist())
    unit = axis.float() / torch.linalg.vector_norm(axis.float())
    return torch.stack([float(m) * sd * unit for m in multiples]).float()


def _vectors_mistakes():
    return (
        Mistake("population std", _vectors_with(lambda p: p.std(correction=0)), "population standard deviation"),
        Mistake("the variance", _vectors_with(lambda p: p.var()), "variance"),
        Mistake("the raw axis", _vectors_with(lambda p: p.std(), normalise=False), "UNIT"),
        Mistake("the mean as the unit", _vectors_with(lambda p: p.mean()), "not their mean"),
        Mistake("float64 result", lambda a, p, m: _vectors_with(lambda x: x.std())(a, p, m).double(), "float32"),
        Mistake("one vector, not one per multiple", lambda a, p, m: sum(_vectors_with(lambda x: x.std())(a, p, m)),
                "one row per multiple"),
    )


# ==================================================================================================
# Exercise 7: cap_activations and activation_capping
# ==================================================================================================

def _cap_with(*, ceiling=False, no_max=False, recompute=False, bf16_out=False, inplace=False, device=True,
              math_dtype=None, shift=None):
    def cap_activations(h, unit_axis, tau):
        a = unit_axis.to(device=h.device, dtype=torch.float32) if device else unit_axis.float()
        if shift is not None:  # the positions below tau moved, but not onto tau along a
            proj = h.float() @ a
            gap = (tau - proj).clamp(min=0).unsqueeze(-1)
            moved = h.float() - gap * a if shift == "subtracted" else h.float() + gap
            return torch.where((proj < tau).unsqueeze(-1), moved.to(h.dtype), h)
        if math_dtype == "h":  # projection and shift in h's dtype
            ah = a.to(h.dtype)
            proj = h @ ah
            return torch.where((proj < tau).unsqueeze(-1), h + (tau - proj).unsqueeze(-1) * ah, h)
        if math_dtype == "axis":  # the axis rounded to h's dtype, then float32 arithmetic
            a = a.to(h.dtype).float()
        proj = h.float() @ a
        if ceiling:
            new = h.float() - (proj - tau).clamp(min=0).unsqueeze(-1) * a
            return new.to(h.dtype)
        if no_max:
            return (h.float() + (tau - proj).unsqueeze(-1) * a).to(h.dtype)
        if recompute:
            return (h.float() - proj.unsqueeze(-1) * a + torch.maximum(proj, torch.tensor(tau)).unsqueeze(-1) * a
                    ).to(h.dtype)
        lifted = h.float() + (tau - proj).clamp(min=0).unsqueeze(-1) * a
        out = torch.where((proj < tau).unsqueeze(-1), lifted.to(h.dtype), h)
        if bf16_out:
            return torch.where((proj < tau).unsqueeze(-1), lifted, h.float())
        if inplace:
            h.copy_(out)
            return h
        return out
    return cap_activations


def cap_masked_assign(h, unit_axis, tau):
    """Index assignment on a clone."""
    out = h.clone()
    a = unit_axis.float().to(h.device)
    proj = h.float() @ a
    idx = proj < tau
    out[idx] = (h[idx].float() + (tau - proj[idx]).unsqueeze(-1) * a).to(h.dtype)
    return out


def cap_relu(h, unit_axis, tau):
    """relu of the shortfall, positions above selected back with where."""
    a = unit_axis.to(h.device).float()
    proj = torch.einsum("...d,d->...", h.float(), a)
    shift = F.relu(tau - proj)
    return torch.where(shift.unsqueeze(-1) > 0, (h.float() + shift.unsqueeze(-1) * a).to(h.dtype), h)


def cap_float64(h, unit_axis, tau):
    a = unit_axis.double().to(h.device)
    proj = h.double() @ a
    new = (h.double() + (tau - proj).clamp(min=0)[..., None] * a).to(h.dtype)
    return torch.where((proj < tau)[..., None], new, h)


def _cap_mistakes():
    return (
        Mistake("capping from above (a ceiling on the axis)", _cap_with(ceiling=True), "caps from above"),
        Mistake("no max(0, .): everything set to tau", _cap_with(no_max=True), "only those with"),
        Mistake("above-threshold activations recomputed", _cap_with(recompute=True), "bit for bit"),
        Mistake("float32 returned for bf16 input", _cap_with(bf16_out=True), "return h's dtype"),
        Mistake("h modified in place", _cap_with(inplace=True), "in place"),
        Mistake("the axis not moved to h's device", _cap_with(device=False), "device_map"),
        Mistake("the shift subtracted (the ceiling's sign on a floor)", _cap_with(shift="subtracted"),
                "lifted exactly to it"),
        Mistake("the shift added to every coordinate (no * a)", _cap_with(shift="every coordinate"),
                "lifted exactly to it"),
        Mistake("the projection and shift in h's dtype (bf16)", _cap_with(math_dtype="h"), "computed in bf16",
                stage="projection and shift in float32 (bf16 h: float32 arithmetic, rounded once to bf16)"),
        Mistake("the axis rounded to h's dtype first", _cap_with(math_dtype="axis"), "computed in bf16",
                stage="projection and shift in float32 (bf16 h: float32 arithmetic, rounded once to bf16)"),
    )


def _capping_cm(*, normalise=True, last_only=False, same_axis=False, finally_=True, ceiling=False, layers_slice=None,
                swallow=False, tuple_ok=True, keep_float=False, device=True, every_threshold=False):
    @contextlib.contextmanager
    def activation_capping(model, axes, thresholds, layers):
        chosen = list(layers)[:layers_slice] if layers_slice else list(layers)
        if every_threshold:  # the layers of `thresholds`, not `layers`
            chosen = sorted(thresholds)

        def make(layer):
            src = chosen[0] if same_axis else layer
            a = axes[src].float()
            a = a / a.norm() if normalise else a
            tau = thresholds[src]

            def hook(module, args, output):
                h = output[0] if isinstance(output, tuple) and tuple_ok else output
                a_ = a.to(h.device) if device else a
                proj = h.float() @ a_
                if ceiling:
                    below = proj > tau
                    shift = (tau - proj)
                else:
                    below = proj < tau
                    shift = (tau - proj)
                if last_only:
                    below = below & (torch.arange(h.shape[1]) == h.shape[1] - 1)
                lifted = h.float() + shift.unsqueeze(-1) * a_
                if keep_float:  # the capped hidden state returned in float32
                    new = torch.where(below.unsqueeze(-1), lifted, h.float())
                else:
                    new = torch.where(below.unsqueeze(-1), lifted.to(h.dtype), h)
                return (new, *output[1:]) if isinstance(output, tuple) and tuple_ok else new
            return hook

        handles = [model.model.layers[l].register_forward_hook(make(l)) for l in chosen]
        if finally_:
            try:
                yield
            except Exception:
                if not swallow:
                    raise
            finally:
                for h in handles:
                    h.remove()
        else:
            yield
            for h in handles:
                h.remove()
    return activation_capping


class CappingClass:
    """__enter__/__exit__, calling the learner's own cap_activations from its namespace."""

    def __init__(self, model, axes, thresholds, layers):
        self.model, self.layers = model, list(layers)
        self.units = {l: F.normalize(axes[l].float(), dim=0) for l in self.layers}
        self.taus = {l: float(thresholds[l]) for l in self.layers}
        self.handles = []

    def __enter__(self):
        for l in self.layers:
            def hook(module, args, output, l=l):
                if isinstance(output, tuple):
                    return (cap_masked_assign(output[0], self.units[l], self.taus[l]),) + output[1:]
                return cap_masked_assign(output, self.units[l], self.taus[l])
            self.handles.append(self.model.model.layers[l].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        while self.handles:
            self.handles.pop().remove()


@contextlib.contextmanager
def capping_exitstack(model, axes, thresholds, layers):
    with contextlib.ExitStack() as stack:
        for l in layers:
            unit = axes[l] / axes[l].norm()

            def hook(module, args, out, unit=unit, tau=thresholds[l]):
                h = out[0] if isinstance(out, tuple) else out
                new = cap_relu(h, unit, tau)
                return (new, *out[1:]) if isinstance(out, tuple) else new
            stack.callback(model.model.layers[l].register_forward_hook(hook).remove)
        yield


@contextlib.contextmanager
def capping_float64(model, axes, thresholds, layers):
    handles = []
    try:
        for l in layers:
            handles.append(model.model.layers[l].register_forward_hook(
                lambda m, a, o, l=l: (cap_float64(o[0], axes[l].double() / axes[l].double().norm(), thresholds[l]),
                                      *o[1:]) if isinstance(o, tuple)
                else cap_float64(o, axes[l].double() / axes[l].double().norm(), thresholds[l])))
        yield
    finally:
        for h in handles:
            h.remove()


def _capping_generator(model, axes, thresholds, layers):
    """A generator without @contextlib.contextmanager."""
    handles = [model.model.layers[l].register_forward_hook(
        lambda m, a, o, l=l: cap_masked_assign(o, F.normalize(axes[l].float(), dim=0), thresholds[l])) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _capping_mistakes():
    return (
        Mistake("a generator without @contextlib.contextmanager", _capping_generator, "not a context manager"),
        Mistake("the axis not normalised", _capping_cm(normalise=False), "Normalise each layer's axis"),
        Mistake("only the last position capped", _capping_cm(last_only=True), "every position"),
        Mistake("the first layer's axis for every layer", _capping_cm(same_axis=True), "its own axis"),
        Mistake("hooks not removed on an exception", _capping_cm(finally_=False), "after an exception"),
        Mistake("capping from above", _capping_cm(ceiling=True), "caps from above"),
        Mistake("only the first layer capped", _capping_cm(layers_slice=1), "cap every layer"),
        Mistake("the exception swallowed", _capping_cm(swallow=True), "swallowed"),
        Mistake("tuple outputs not handled (the hook assumes a tensor)", _capping_cm(tuple_ok=False), "tuple"),
        Mistake("every layer of `thresholds` capped, not those of `layers`", _capping_cm(every_threshold=True),
                "not in `layers`"),
        Mistake("the capped hidden state returned in float32", _capping_cm(keep_float=True), "block's own dtype",
                stage="any dtype: a bf16 model stays bf16"),
        Mistake("the axis not moved to the hidden state's device", _capping_cm(device=False), "device_map"),
    )


# ==================================================================================================
# Exercise 8: next_token_kl
# ==================================================================================================

def _kl_with(*, reverse=False, softmax_log=False, dtype=None, reduce="sum", scalar=False):
    def next_token_kl(logits_p, logits_q):
        lp_, lq_ = (logits_q, logits_p) if reverse else (logits_p, logits_q)
        if dtype is None:
            lp_, lq_ = lp_.float(), lq_.float()
        elif dtype == "late":  # log_softmax in the logits' dtype, the rest in float32
            lp, lq = torch.log_softmax(lp_, -1).float(), torch.log_softmax(lq_, -1).float()
            return (lp.exp() * (lp - lq)).sum(-1)
        elif dtype == "bf16 only":  # only bf16 converted: float64 stays float64
            lp_, lq_ = (lp_.float(), lq_.float()) if lp_.dtype == torch.bfloat16 else (lp_, lq_)
        if softmax_log:
            p, q = torch.softmax(lp_, -1), torch.softmax(lq_, -1)
            kl = p * (torch.log(p) - torch.log(q))
        else:
            lp, lq = torch.log_softmax(lp_, -1), torch.log_softmax(lq_, -1)
            kl = lp.exp() * (lp - lq)
        out = kl.sum(-1) if reduce == "sum" else kl.mean(-1)
        out = out.float() if dtype is None else out
        return out.mean() if scalar else out
    return next_token_kl


def kl_div_builtin(logits_p, logits_q):
    lp = F.log_softmax(logits_p.float(), dim=-1)
    lq = F.log_softmax(logits_q.float(), dim=-1)
    return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)


def kl_distributions(logits_p, logits_q):
    from torch.distributions import Categorical

    return torch.distributions.kl_divergence(Categorical(logits=logits_p.float()), Categorical(logits=logits_q.float()))


def kl_explicit(logits_p, logits_q):
    lp = torch.log_softmax(logits_p.to(torch.float32), -1)
    lq = torch.log_softmax(logits_q.to(torch.float32), -1)
    return torch.sum(torch.exp(lp) * lp - torch.exp(lp) * lq, dim=-1)


def kl_logsumexp(logits_p, logits_q):
    p32, q32 = logits_p.double(), logits_q.double()
    lp = p32 - torch.logsumexp(p32, -1, keepdim=True)
    lq = q32 - torch.logsumexp(q32, -1, keepdim=True)
    return (torch.exp(lp) * (lp - lq)).sum(-1).float()


def _kl_mistakes():
    return (
        Mistake("KL(Q || P)", _kl_with(reverse=True), "KL(Q || P)"),
        Mistake("softmax then log", _kl_with(softmax_log=True), "log_softmax"),
        Mistake("computed in the logits' dtype (bf16)", _kl_with(dtype="keep"), "float32", stage="any float dtype in, float32 out, computed in float32"),
        Mistake("mean over the vocabulary", _kl_with(reduce="mean"), "averaged over the vocabulary"),
        Mistake("one scalar (batchmean)", _kl_with(scalar=True), "per position"),
        Mistake("torch.distributions.kl_divergence (inf where Q underflows)", kl_distributions, "log_softmax"),
        Mistake("log_softmax in bf16, the rest in float32", _kl_with(dtype="late"), "BEFORE log_softmax",
                stage="any float dtype in, float32 out, computed in float32"),
        Mistake("only bf16 converted (float64 logits give float64)", _kl_with(dtype="bf16 only"), "float64",
                stage="any float dtype in, float32 out, computed in float32"),
    )


def _build() -> list[Entry]:
    return [
        Entry("transcripts", "test_parse_transcript", _parse_mistakes(), (
            Variant("itertools.pairwise over roles", parse_pairwise),
            Variant("the role each position requires", parse_expected_roles),
            Variant("dataclasses", parse_dataclass),
        )),
        Entry("per-turn projection", "test_turn_projections", _turn_mistakes() + (
            Mistake("the course's per_turn_mean_activations called", turns_utils_activations, "hands the work to the course's own"),), (
            Variant("a forward hook per window, float64 projection", turns_hooks),
            Variant("output_hidden_states per window, a hook at the last block", turns_hidden_states),
            Variant("numpy means over ids cut at the last span", turns_numpy),
        )),
        Entry("threshold", "test_capping_threshold", _threshold_mistakes(), (
            Variant("torch.quantile in float64", threshold_torch),
            Variant("linear interpolation by hand", threshold_manual),
            Variant("numpy.quantile with a fraction", threshold_statistics),
            Variant("numpy.percentile linear", _threshold_np()),
        )),
        Entry("drift", "test_drift_summary", _drift_mistakes(), (
            Variant("np.polyfit with turns from 1", drift_polyfit),
            Variant("torch.linalg.lstsq", drift_lstsq),
            Variant("scipy linregress", drift_scipy),
        )),
        Entry("steering", "test_add_steering", _steering_mistakes(), (
            Variant("in-place add, hook returns None", steering_in_place),
            Variant("a class with __enter__/__exit__", SteeringClass),
            Variant("contextlib.ExitStack", steering_exitstack),
        )),
        Entry("steering", "test_steering_vectors", _vectors_mistakes(), (
            Variant("numpy outer product", vectors_numpy),
            Variant("einsum", vectors_einsum),
            Variant("statistics.stdev", vectors_statistics),
        )),
        Entry("capping", "test_cap_activations", _cap_mistakes(), (
            Variant("masked index assignment on a clone", cap_masked_assign),
            Variant("relu of the shortfall", cap_relu),
            Variant("float64 arithmetic", cap_float64),
        )),
        Entry("capping", "test_activation_capping", _capping_mistakes(), (
            Variant("a class with __enter__/__exit__", CappingClass),
            Variant("contextlib.ExitStack callbacks", capping_exitstack),
            Variant("float64 cap inside the hook", capping_float64),
        )),
        Entry("cost", "test_next_token_kl", _kl_mistakes(), (
            Variant("F.kl_div with log_target", kl_div_builtin),
            Variant("explicit probabilities from log_softmax", kl_explicit),
            Variant("logsumexp in float64", kl_logsumexp),
        )),
    ]


CATALOGUE: list[Entry] = _build()
