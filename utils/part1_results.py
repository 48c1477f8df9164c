"""Part 1's results, saved by its notebook and loaded by Part 2.

Two files in one folder (``out/part1/`` by default):

- ``part1_results.safetensors``: the tensors, float32 (``persona_vectors`` ``[n_personas, n_layers, d_model]``,
  ``axis`` ``[n_layers, d_model]``, and optionally ``default_activations``
  ``[n_default_responses, n_layers, d_model]``);
- ``part1_results.json``: everything else (model name, layer, persona names, which are defaults, extra).

Load with :func:`load_part1_results` (safetensors, no pickle). :func:`load_or_compute_part1_results`
loads them, or recomputes them with the course's fast machinery when Part 1 has not been run.

The axis is stored raw, ``mean(default vectors) - mean(role vectors)`` at every layer (not unit
norm): the paper's steering coefficients multiply the raw axis. :meth:`Part1Results.unit_axis`
gives the unit vector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from utils.data import DEFAULT_PERSONA_NAMES, WORKING_QUESTION_IDS, WORKING_ROLES
from utils.models import default_layer
from utils.pipeline import DEFAULT, Config, Pipeline
from utils.judges import OfflineRuleJudge

__all__ = [
    "FORMAT_VERSION",
    "Part1Results",
    "Part1ResultsError",
    "load_or_compute_part1_results",
    "load_part1_results",
    "save_part1_results",
]

FORMAT_VERSION = 1
TENSORS_FILE = "part1_results.safetensors"
META_FILE = "part1_results.json"


class Part1ResultsError(ValueError):
    """Saved Part 1 results that are corrupt, inconsistent, or for another model; the message says what to do."""


@dataclass(frozen=True)
class Part1Results:
    """Part 1's persona vectors and Assistant Axis at every layer.

    Attributes:
        model_name: the model they were computed with (e.g. ``"smollm2-135m-instruct"``).
        layer: Part 1's working layer (layer l = output of ``model.model.layers[l]``).
        names: persona names, in the order of ``persona_vectors``' first axis.
        persona_vectors: ``[n_personas, n_layers, d_model]`` float32, one mean activation per persona and layer.
        default_names: the names (a subset of ``names``) of the default-Assistant personas.
        axis: ``[n_layers, d_model]`` float32, ``mean(defaults) - mean(roles)`` per layer (raw, not unit).
        default_activations: ``[n_default_responses, n_layers, d_model]`` float32, the mean activation of
            every default-persona response (for capping thresholds), or None if not saved.
        extra: JSON metadata (e.g. how the results were computed).
    """

    model_name: str
    layer: int
    names: list[str]
    persona_vectors: Float[Tensor, "n_personas n_layers d_model"]
    default_names: list[str]
    axis: Float[Tensor, "n_layers d_model"]
    default_activations: Float[Tensor, "n_default_responses n_layers d_model"] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.axis.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.axis.shape[1])

    @property
    def is_default(self) -> Bool[Tensor, " n_personas"]:
        """Bool ``[n_personas]``: True for the default personas."""
        return torch.tensor([n in self.default_names for n in self.names])

    def unit_axis(self, layer: int | None = None) -> Float[Tensor, " d_model"]:
        """The axis at ``layer`` (default: Part 1's layer), normalised to unit length."""
        a = self.axis[self.layer if layer is None else layer]
        return a / a.norm()

    def vectors_at(self, layer: int | None = None) -> Float[Tensor, "n_personas d_model"]:
        """Every persona's vector at ``layer`` (default: Part 1's layer)."""
        return self.persona_vectors[:, self.layer if layer is None else layer]


def _validate(model_name, layer, names, persona_vectors, default_names, axis, default_activations, extra, where: str):
    """Raise Part1ResultsError naming the first inconsistency."""
    def bad(msg: str):
        raise Part1ResultsError(f"{where}: {msg}")

    if not isinstance(model_name, str) or not model_name:
        bad(f"model_name must be a non-empty string; got {model_name!r}.")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        bad("names must be a list of distinct strings.")
    if not isinstance(default_names, list) or not default_names or any(n not in names for n in default_names):
        bad(f"default_names must be a non-empty list of names from `names`; got {default_names!r}.")
    if len(default_names) == len(names):
        bad("every persona is a default: the axis needs at least one role.")
    for label, t, ndim in (("persona_vectors", persona_vectors, 3), ("axis", axis, 2)):
        if not isinstance(t, Tensor) or t.ndim != ndim:
            bad(f"{label} must be a {ndim}-D tensor; got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}.")
        if not bool(torch.isfinite(t).all()):
            bad(f"{label} has NaN or infinite values.")
    if persona_vectors.shape[0] != len(names):
        bad(f"persona_vectors has {persona_vectors.shape[0]} rows but there are {len(names)} names.")
    if tuple(axis.shape) != tuple(persona_vectors.shape[1:]):
        bad(f"axis is {tuple(axis.shape)} but persona_vectors is {tuple(persona_vectors.shape)}: "
            "axis must be [n_layers, d_model] with the same n_layers and d_model.")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < axis.shape[0]:
        bad(f"layer must be an int in 0..{axis.shape[0] - 1}; got {layer!r}.")
    if default_activations is not None:
        if (not isinstance(default_activations, Tensor) or default_activations.ndim != 3
                or tuple(default_activations.shape[1:]) != tuple(axis.shape) or default_activations.shape[0] == 0):
            got = (tuple(default_activations.shape) if isinstance(default_activations, Tensor)
                   else type(default_activations).__name__)
            bad(f"default_activations must be [n_default_responses >= 1, {axis.shape[0]}, {axis.shape[1]}]; got {got}.")
        if not bool(torch.isfinite(default_activations).all()):
            bad("default_activations has NaN or infinite values.")
    if not isinstance(extra, dict):
        bad(f"extra must be a dict; got {type(extra).__name__}.")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        bad(f"extra must be JSON-serialisable (numbers, strings, lists, dicts): {exc}.")


def save_part1_results(
    out_dir: str | Path,
    *,
    model_name: str,
    layer: int,
    names: list[str],
    persona_vectors: Float[Tensor, "n_personas n_layers d_model"],
    default_names: list[str],
    axis: Float[Tensor, "n_layers d_model"],
    extra: dict | None = None,
    default_activations: Float[Tensor, "n_default_responses n_layers d_model"] | None = None,
) -> Path:
    """Write ``part1_results.safetensors`` (tensors, float32) and ``part1_results.json`` (the rest) to ``out_dir``.

    Both files are written to temporary names first and then renamed, the JSON last, so a crash never
    leaves a half-written pair that looks complete.

    Returns:
        the path of the JSON file.

    Raises:
        Part1ResultsError: inconsistent shapes or names, NaN/inf values, non-JSON ``extra``.
    """
    names, default_names, extra = list(names), list(default_names), dict(extra or {})
    _validate(model_name, layer, names, persona_vectors, default_names, axis, default_activations, extra,
              "save_part1_results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"persona_vectors": persona_vectors.detach().float().cpu().contiguous(),
               "axis": axis.detach().float().cpu().contiguous()}
    if default_activations is not None:
        tensors["default_activations"] = default_activations.detach().float().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "model_name": model_name, "layer": layer, "names": names,
            "default_names": default_names, "n_layers": int(axis.shape[0]), "d_model": int(axis.shape[1]),
            "has_default_activations": default_activations is not None, "extra": extra,
            "convention": "layer l = output of model.model.layers[l] = hidden_states[l + 1]; axis = "
                          "mean(default vectors) - mean(role vectors), raw"}
    tmp_t, tmp_m = out / (TENSORS_FILE + ".tmp"), out / (META_FILE + ".tmp")
    save_file(tensors, str(tmp_t), metadata={"model_name": model_name, "format_version": str(FORMAT_VERSION)})
    tmp_m.write_text(json.dumps(meta, indent=2, allow_nan=False))
    (out / META_FILE).unlink(missing_ok=True)  # the pair is incomplete until the JSON is back
    tmp_t.replace(out / TENSORS_FILE)
    tmp_m.replace(out / META_FILE)
    return out / META_FILE


def load_part1_results(out_dir: str | Path, model_name: str | None = None) -> Part1Results | None:
    """Part 1's saved results in ``out_dir``, or None if there are none.

    Args:
        out_dir: the folder :func:`save_part1_results` wrote to.
        model_name: if given, the results must be for this model.

    Returns:
        :class:`Part1Results`, or None when neither file exists.

    Raises:
        Part1ResultsError: only one of the two files exists, either is unreadable or inconsistent,
            or the results are for another model than ``model_name``. The message says how to fix it.
    """
    out = Path(out_dir)
    t_path, m_path = out / TENSORS_FILE, out / META_FILE
    if not t_path.exists() and not m_path.exists():
        return None
    fix = f"Rerun Part 1 (it saves them), or delete {t_path.name} and {m_path.name} in {out} to recompute."
    if not (t_path.exists() and m_path.exists()):
        present = t_path if t_path.exists() else m_path
        raise Part1ResultsError(f"{out}: only {present.name} is there; the results are incomplete. {fix}")
    try:
        meta = json.loads(m_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Part1ResultsError(f"{m_path}: not valid JSON ({exc}). {fix}") from None
    try:
        tensors = load_file(str(t_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise Part1ResultsError(f"{t_path}: not a readable safetensors file ({exc}). {fix}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise Part1ResultsError(f"{m_path}: format_version {version!r}, expected {FORMAT_VERSION}. {fix}")
    missing = [k for k in ("model_name", "layer", "names", "default_names") if k not in meta]
    missing += [k for k in ("persona_vectors", "axis") if k not in tensors]
    if missing:
        raise Part1ResultsError(f"{out}: missing {missing}. {fix}")
    if model_name is not None and meta["model_name"] != model_name:
        raise Part1ResultsError(f"{out} holds Part 1 results for {meta['model_name']!r}, not {model_name!r}. Use "
                                f"another output folder for {model_name!r}, rerun Part 1 with it, or delete those files.")
    default_activations = tensors.get("default_activations")
    if bool(meta.get("has_default_activations")) != (default_activations is not None):
        raise Part1ResultsError(f"{out}: the JSON and the tensors disagree about default_activations. {fix}")
    _validate(meta["model_name"], meta["layer"], meta["names"], tensors["persona_vectors"], meta["default_names"],
              tensors["axis"], default_activations, meta.get("extra", {}), str(out))
    return Part1Results(meta["model_name"], meta["layer"], meta["names"], tensors["persona_vectors"],
                        meta["default_names"], tensors["axis"], default_activations, meta.get("extra", {}))


def _computing_notice(out: Path, model_name: str, *, n_answers: int, max_new_tokens: int, n_layers: int) -> str:
    """What is about to happen when Part 1's results are missing, said before the wait starts."""
    return (f"No saved Part 1 results for {model_name} in {out}: computing them now. That is {n_answers} answers of "
            f"up to {max_new_tokens} new tokens to generate, judge (offline rule judge) and read at all {n_layers} "
            f"layers: the longest step of this notebook (docs/results.md has measured times). Each stage shows a "
            f"progress bar with its time left. Running Part 1's notebook first saves these results, and they then "
            f"load in seconds.")


def load_or_compute_part1_results(
    model,
    tokenizer,
    model_name: str,
    out_dir: str | Path,
    *,
    n_questions: int,
    max_new_tokens: int,
    layer: int | None = None,
    roles: Sequence[str] | None = None,
    min_score: int = 2,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    workers: int = 16,
) -> tuple[Part1Results, str]:
    """Part 1's results from ``out_dir``, or computed now (and saved there) if Part 1 has not been run.

    The computation is the runner's (:class:`utils.pipeline.Pipeline`: the same generation, judging and
    extraction stages, with its resumable cache under ``out_dir/pipeline_cache``), on Part 1's working set:
    the 5 default prompts and one prompt of each of ``roles`` (default Part 1's 16,
    :data:`utils.data.WORKING_ROLES`), ``n_questions`` working questions (:data:`utils.data.WORKING_QUESTION_IDS`),
    local sampling (``temperature``, ``top_p``, ``max_new_tokens``), the offline rule judge
    (:class:`utils.judges.OfflineRuleJudge`, a rule-based stand-in, not an LLM) with each role's own judge
    prompt, role responses kept when scored ``>= min_score`` (defaults always kept; offline Part 1 keeps
    score 2 too), and the mean activations at every layer. A role left with no response is dropped and
    named in ``extra["dropped_roles"]``; a failed generation is counted in ``extra["failed_responses"]``.
    The axis is ``mean(default vectors) - mean(role vectors)`` at every layer.

    Args:
        model, tokenizer: the loaded model; ``model_name`` its course name (fills "You are {model_name}.").
        out_dir: where Part 1 saves its results (``out/part1`` by default in the notebooks).
        n_questions, max_new_tokens: the size of the run if it has to be computed.
        layer: Part 1's working layer to record (default :func:`utils.models.default_layer`).
        workers: threads that judge at once.

    Returns:
        ``(results, sentence)``: the sentence says whether they were loaded or computed, and from/to where.

    Raises:
        Part1ResultsError: results in ``out_dir`` that are corrupt or for another model (never overwritten).
        RuntimeError: no default response or no role left to build an axis from.
    """
    out = Path(out_dir)
    found = load_part1_results(out, model_name=model_name)
    if found is not None:
        how = found.extra.get("computed_by", "Part 1's notebook")
        return found, (f"Loaded Part 1's results for {model_name} from {out} ({len(found.names)} personas, "
                       f"{found.n_layers} layers; computed by {how}).")

    if n_questions < 1 or max_new_tokens < 1:
        raise ValueError(f"n_questions and max_new_tokens must be >= 1; got {n_questions}, {max_new_tokens}.")
    if n_questions > len(WORKING_QUESTION_IDS):
        raise ValueError(f"n_questions must be at most {len(WORKING_QUESTION_IDS)} (the working questions).")
    n_layers = int(model.config.num_hidden_layers)
    layer = default_layer(model_name, n_layers) if layer is None else layer
    roles = list(WORKING_ROLES if roles is None else roles)
    cfg = Config(model=model_name, roles=roles, n_questions=n_questions, n_prompts=1,
                 n_default_prompts=len(DEFAULT_PERSONA_NAMES), question_ids=WORKING_QUESTION_IDS[:n_questions],
                 layers=list(range(n_layers)), max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 min_score=min_score, min_count=1, workers=workers, chunk_size=batch_size, seed=seed,
                 cache_dir=out / "pipeline_cache", out_dir=out / "pipeline_out")
    if progress:
        print(_computing_notice(out, model_name, n_answers=(len(DEFAULT_PERSONA_NAMES) + len(roles)) * n_questions,
                                max_new_tokens=max_new_tokens, n_layers=n_layers), flush=True)
    pipeline = Pipeline(cfg, model, tokenizer, judge_client=OfflineRuleJudge(), progress=progress)
    pipeline.generate()
    pipeline.judge()
    pipeline.extract()
    acts = pipeline.activations()  # key -> [n_layers, d_model] float32

    default_names = list(pipeline.default_prompts)  # prompt index p -> the p-th default persona's name
    kept: dict[str, list[str]] = {}
    for item in pipeline.items():
        if item.key not in acts:
            continue
        if item.persona == DEFAULT:
            kept.setdefault(default_names[item.prompt], []).append(item.key)
        elif pipeline.judgements.ok(item.key) and pipeline.judgements.records[item.key]["score"] >= min_score:
            kept.setdefault(item.persona, []).append(item.key)
    names = [n for n in default_names + roles if n in kept]
    dropped = [n for n in default_names + roles if n not in kept]
    kept_defaults = [n for n in names if n in default_names]
    if not kept_defaults:
        raise RuntimeError("No default-persona response survived generation: the axis needs them.")
    if len(kept_defaults) == len(names):
        raise RuntimeError(f"No role kept a response with score >= {min_score}: the axis needs at least one role. "
                           "Lower min_score or generate more questions.")
    persona_vectors = torch.stack([torch.stack([acts[k] for k in kept[n]]).mean(0) for n in names])
    is_default = torch.tensor([n in kept_defaults for n in names])
    axis = persona_vectors[is_default].mean(0) - persona_vectors[~is_default].mean(0)
    default_activations = torch.stack([acts[k] for n in kept_defaults for k in kept[n]])
    failed = [it.key for it in pipeline.items() if not pipeline.responses.ok(it.key)]
    extra = {"computed_by": "utils.part1_results.load_or_compute_part1_results (the runner's stages, offline rule "
                            "judge)",
             "n_questions": n_questions, "max_new_tokens": max_new_tokens, "min_score": min_score,
             "temperature": temperature, "top_p": top_p, "seed": seed, "responses": len(acts),
             "kept": sum(map(len, kept.values())), "failed_responses": len(failed), "dropped_roles": dropped}
    save_part1_results(out, model_name=model_name, layer=layer, names=names, persona_vectors=persona_vectors,
                       default_names=kept_defaults, axis=axis, extra=extra, default_activations=default_activations)
    sentence = (f"Computed Part 1's results for {model_name} now (no saved results in {out}): {len(names)} personas x "
                f"{n_questions} questions, {max_new_tokens} new tokens, offline rule judge (score >= {min_score}), "
                f"all {n_layers} layers; saved to {out}.")
    if dropped:
        sentence += f" Dropped (no kept response): {dropped}."
    results = load_part1_results(out, model_name=model_name)  # exactly what a later load gives
    assert results is not None
    return results, sentence
