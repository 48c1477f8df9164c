"""Trait vectors: Section 7 of Part 1, and the machinery of Part 3 ("Trait vectors", the Persona Vectors method).

Part 1:

- ``TRAITS_SUBSET``: 12 of the paper's 240 traits, chosen to spread along the Assistant Axis. The paper
  finds transparent / grounded / flexible at the assistant end and enigmatic / subversive / dramatic at
  the role-play end; the list alternates between the two ends, so any prefix of 2 or more spans both.
- ``load_precomputed_trait_vectors(model_name, layer)``: the paper's Gemma 2 27B trait vectors from the
  Hugging Face hub, or ``None`` with a printed reason, in which case the notebook computes them itself.

Part 3 (the course's reference for each exercise, and the plumbing around them; see the section below):
contrastive system prompts and the question split, the pair filter, trait vectors per layer, spread-scaled
steering vectors and the layer sweep, monitoring prompts and correlations, cosines, the screening toy datasets
and their projection differences. The 0-100 judge is in :mod:`utils.judges`, the one-pass averages in
:mod:`utils.activations`, the steering modes in :mod:`utils.steering`, the finetune in :mod:`utils.finetune`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import huggingface_hub
import torch
from huggingface_hub.errors import EntryNotFoundError
from jaxtyping import Bool, Float
from tqdm.auto import tqdm
from torch import Tensor

from utils.activations import unit_vector
from utils.conversation import Message, chat_messages
from utils.data import Trait
from utils.conversation import render
from utils.generation import CPU_BATCH_SIZE, GPU_BATCH_SIZE, generate
from utils.models import GEMMA2_27B
from utils.steering import Positions, steering

HF_REPO_ID = "lu-christina/assistant-axis-vectors"
# Model name -> folder inside HF_REPO_ID holding ``trait_vectors/<trait>.pt``.
PRECOMPUTED_FOLDERS = {GEMMA2_27B: "gemma-2-27b"}

# Alternating: assistant-like end, role-play end, ...
TRAITS_SUBSET: list[str] = [
    "transparent", "enigmatic",
    "grounded", "mystical",
    "analytical", "dramatic",
    "methodical", "whimsical",
    "cautious", "theatrical",
    "calm", "subversive",
]


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub could not give us the file" (network down, offline mode, 404, ...).

    ``OSError`` covers ``ConnectionError``, ``huggingface_hub``'s HTTP errors, ``LocalEntryNotFoundError``
    (raised when the hub is unreachable and the file is not cached) and ``requests`` errors. Transport
    errors of the HTTP clients ``huggingface_hub`` may use are added when importable.
    """
    errors: list[type[BaseException]] = [OSError, EntryNotFoundError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _select_layer(vector: Float[Tensor, " d_model"] | Float[Tensor, "n_layers d_model"], layer: int,
                  trait: str) -> Float[Tensor, " d_model"]:
    """``[d_model]`` from a ``[d_model]`` vector or row ``layer`` of a ``[n_layers, d_model]`` stack.

    The paper's files are ``[46, 4608]`` for Gemma 2 27B; row ``i`` is the output of block
    ``model.model.layers[i]`` (the course's layer convention, and the paper's: it steers with
    ``axis[22]`` at ``layer_indices=[22]``).
    """
    if not isinstance(vector, torch.Tensor):
        raise TypeError(f"Trait vector file for {trait!r} holds a {type(vector).__name__}, not a tensor.")
    if vector.ndim == 1:
        return vector.float()
    if vector.ndim == 2:
        if not -vector.shape[0] <= layer < vector.shape[0]:
            raise ValueError(f"Layer {layer} is out of range for {trait!r}'s trait vectors of shape "
                             f"{tuple(vector.shape)} ([n_layers, d_model]).")
        return vector[layer].float()
    raise ValueError(f"Expected a [d_model] or [n_layers, d_model] tensor for {trait!r}, got shape "
                     f"{tuple(vector.shape)}.")


def load_precomputed_trait_vectors(
    model_name: str, layer: int, traits: list[str] | None = None
) -> tuple[dict[str, Float[Tensor, " d_model"]] | None, str]:
    """The paper's precomputed trait vectors at ``layer``, when there are any and the hub is reachable.

    Only ``google/gemma-2-27b-it`` has them (``gemma-2-27b/trait_vectors/<trait>.pt`` in the dataset
    ``lu-christina/assistant-axis-vectors``). Files are loaded with ``torch.load(weights_only=True)``,
    so a file holding anything but tensors is rejected.

    Args:
        model_name: the model the notebook runs.
        layer: the block whose output the vectors are read at (row ``layer`` of a 2-D file).
        traits: trait names (default ``TRAITS_SUBSET``).

    Returns:
        ``(vectors, source)``: trait -> float32 ``[d_model]`` and a sentence saying where they came from;
        or ``(None, reason)`` when there are no precomputed vectors for this model or the hub cannot be
        reached. The notebook prints the sentence either way.

    Raises:
        Anything other than a hub/network error, e.g. a corrupt or unsafe file, propagates.
    """
    traits = list(TRAITS_SUBSET if traits is None else traits)
    folder = PRECOMPUTED_FOLDERS.get(model_name)
    if folder is None:
        return None, f"no precomputed vectors for {model_name}: computing them for this model"
    paths = {}
    for trait in traits:
        filename = f"{folder}/trait_vectors/{trait}.pt"
        try:
            paths[trait] = huggingface_hub.hf_hub_download(repo_id=HF_REPO_ID, repo_type="dataset",
                                                           filename=filename)
        except _hub_errors() as exc:
            return None, (f"could not reach the Hugging Face hub ({type(exc).__name__}): computing trait "
                          f"vectors for this model instead")
    # Outside the try: a corrupt or non-tensor file is an error to see, not a reason to fall back.
    vectors = {trait: _select_layer(torch.load(path, map_location="cpu", weights_only=True), layer, trait)
               for trait, path in paths.items()}
    return vectors, (f"precomputed by the paper (Hugging Face {HF_REPO_ID}, {folder}/trait_vectors, "
                     f"layer {layer})")


# ===================================================================================================
# Part 3: trait vectors (the Persona Vectors method)
# ===================================================================================================

N_EXTRACT = 20  # questions 0-19 of each trait file extract; 20-39 evaluate
SCORE_THRESHOLD = 50.0
COHERENCE_THRESHOLD = 50.0


def indefinite_article(word: str) -> str:
    """``"an"`` before a vowel letter, ``"a"`` otherwise ("an evil", "an optimistic", "a sycophantic")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def system_prompt(trait_name: str, instruction: str, positive: bool) -> str:
    """The Persona Vectors system prompt: ``"You are {a/an} {name} assistant. {instruction}"``, with the trait's name
    for a positive instruction and ``"helpful"`` for a negative one (the paper's ``--assistant_name``)."""
    name = trait_name.replace("_", " ") if positive else "helpful"
    return f"You are {indefinite_article(name)} {name} assistant. {instruction}"


def contrastive_system_prompts(trait: Trait, n_pairs: int | None = None) -> list[tuple[str, str]]:
    """``(positive, negative)`` system prompts of the trait's first ``n_pairs`` instruction pairs (default all 5)."""
    n = len(trait.pos_prompts) if n_pairs is None else n_pairs
    if not 1 <= n <= len(trait.pos_prompts):
        raise ValueError(f"n_pairs must be in 1..{len(trait.pos_prompts)}; got {n_pairs}.")
    return [(system_prompt(trait.name, pos, True), system_prompt(trait.name, neg, False))
            for pos, neg in zip(trait.pos_prompts[:n], trait.neg_prompts[:n])]


def split_questions(questions: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(extraction, evaluation)``: questions 0-19 and 20-39 of a trait file's 40, in order."""
    if len(questions) != 2 * N_EXTRACT:
        raise ValueError(f"A trait file has {2 * N_EXTRACT} questions; got {len(questions)}.")
    return list(questions[:N_EXTRACT]), list(questions[N_EXTRACT:])


@dataclass(frozen=True)
class ContrastiveAnswer:
    """One answer of the contrastive set: the trait, the instruction pair, the question, the rollout and the polarity."""

    trait: str
    pair: int
    question_index: int  # in the trait's extraction questions (= its index in the trait file: they come first)
    question: str
    rollout: int
    positive: bool
    system: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[Message]:
        return chat_messages(self.system, self.question, self.answer if with_answer else None)


def generate_answers(model, tokenizer, prompts: Sequence[list[Message]], max_new_tokens: int, temperature: float,
                     top_p: float = 1.0, seed: int = 0, rollouts: int = 1, progress: bool = True,
                     desc: str = "generate") -> list[list[str]]:
    """``rollouts`` answers to every prompt (sampled at ``temperature``; 0 is greedy): ``out[i][r]``.

    The rows are sorted by prompt length and cut into the batches :func:`utils.generation.generate` would form (32 rows
    on a CPU, 256 on a GPU), one ``generate`` call per batch (seed ``seed + batch``) under a tqdm bar; each row samples
    its own tokens.
    """
    if not prompts:
        return []
    rows = [list(p) for p in prompts for _ in range(rollouts)]
    lengths = [len(render(r, tokenizer, add_generation_prompt=True)) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (lengths[i], i))
    size = GPU_BATCH_SIZE if model.get_input_embeddings().weight.device.type == "cuda" else CPU_BATCH_SIZE
    texts: list[str] = [""] * len(rows)
    for b in tqdm(range(0, len(order), size), desc=desc, unit="batch", disable=not progress):
        chunk = order[b:b + size]
        for i, text in zip(chunk, generate(model, tokenizer, [rows[i] for i in chunk], max_new_tokens,
                                           temperature=temperature, top_p=top_p, seed=seed + b // size)):
            texts[i] = text
    return [texts[i * rollouts:(i + 1) * rollouts] for i in range(len(prompts))]


def contrastive_answers(model, tokenizer, prompts: dict[str, list[tuple[str, str]]], questions: dict[str, list[str]],
                        rollouts: int, max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0,
                        ) -> tuple[list[ContrastiveAnswer], list[ContrastiveAnswer]]:
    """Every trait's answers under each of its (positive, negative) system prompts, for each question and rollout.

    Args:
        prompts: ``{trait: [(positive system prompt, negative system prompt), ...]}``, one pair per instruction pair.
        questions: ``{trait: [question, ...]}``; an answer's ``question_index`` is the question's place in this list.

    Returns ``(positive, negative)``: two lists in the same order, row ``i`` of one the counterpart of row ``i`` of
    the other (same trait, pair, question and rollout). All answers come from one :func:`generate_answers` call.
    An empty answer is kept as ``""`` (the judge and the filter drop its pair, and the notebook counts it).
    """
    keys, conversations = [], []
    for trait, pairs in prompts.items():
        for pair, (pos, neg) in enumerate(pairs):
            for q, question in enumerate(questions[trait]):
                for positive, system in ((True, pos), (False, neg)):
                    keys.append((trait, pair, q, question, positive, system))
                    conversations.append(chat_messages(system, question))
    texts = generate_answers(model, tokenizer, conversations, max_new_tokens, temperature, top_p, seed, rollouts,
                             desc="contrastive answers")
    by_sign: dict[bool, list[ContrastiveAnswer]] = {True: [], False: []}
    for (trait, pair, q, question, positive, system), answers in zip(keys, texts):
        for r, text in enumerate(answers):
            by_sign[positive].append(ContrastiveAnswer(trait, pair, q, question, r, positive, system, text))
    return by_sign[True], by_sign[False]


def effective_pairs(pos_scores: Sequence[float | None], neg_scores: Sequence[float | None],
                    pos_coherence: Sequence[float | None], neg_coherence: Sequence[float | None],
                    threshold: float = SCORE_THRESHOLD, coherence_threshold: float = COHERENCE_THRESHOLD,
                    ) -> Bool[Tensor, " n_pairs"]:
    """The Persona Vectors filter: pair ``i`` is kept when its positive answer scores ``>= threshold``, its negative
    ``< threshold`` (the paper's ``< 100 - threshold`` at 50), and both are coherent (``>= coherence_threshold``).
    A None (the judge gave no score) fails its test. Row ``i`` of every list is the same pair."""
    lengths = {len(pos_scores), len(neg_scores), len(pos_coherence), len(neg_coherence)}
    if len(lengths) != 1:
        raise ValueError(f"The four lists must have one entry per pair; got lengths {sorted(lengths)}.")

    def at_least(x, t):
        return x is not None and x >= t

    return torch.tensor([at_least(p, threshold) and n is not None and n < threshold and at_least(pc, coherence_threshold)
                         and at_least(nc, coherence_threshold)
                         for p, n, pc, nc in zip(pos_scores, neg_scores, pos_coherence, neg_coherence)], dtype=torch.bool)


def drop_reasons(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold: float = SCORE_THRESHOLD,
                 coherence_threshold: float = COHERENCE_THRESHOLD) -> dict[str, int]:
    """How many pairs fail each test of :func:`effective_pairs` (a pair can fail several): the notebook's report."""
    out = {"positive not scored": 0, "positive below threshold": 0, "negative not scored": 0,
           "negative at or above threshold": 0, "positive incoherent or unscored": 0,
           "negative incoherent or unscored": 0}
    for p, n, pc, nc in zip(pos_scores, neg_scores, pos_coherence, neg_coherence):
        out["positive not scored"] += p is None
        out["positive below threshold"] += p is not None and p < threshold
        out["negative not scored"] += n is None
        out["negative at or above threshold"] += n is not None and n >= threshold
        out["positive incoherent or unscored"] += pc is None or pc < coherence_threshold
        out["negative incoherent or unscored"] += nc is None or nc < coherence_threshold
    return out


def trait_vectors(pos: Float[Tensor, "n_pos n_layers d_model"], neg: Float[Tensor, "n_neg n_layers d_model"],
                  ) -> Float[Tensor, "n_layers d_model"]:
    """``mean(pos) - mean(neg)`` at every layer, in float32."""
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError("A trait vector needs at least one positive and one negative activation.")
    return pos.float().mean(0) - neg.float().mean(0)


def projection_spread(activations: Float[Tensor, "n d_model"], vector: Float[Tensor, " d_model"]) -> float:
    """The sample standard deviation of ``activations`` projected on the unit vector: the unit of a steering
    coefficient (as Part 2 measures the axis in persona-spreads)."""
    unit = vector.float() / vector.float().norm()
    return float((activations.float() @ unit).std())


def spread_scaled_vectors(vectors: Float[Tensor, "n_layers d_model"],
                          activations: Float[Tensor, "n n_layers d_model"], layers: Sequence[int],
                          multiple: float) -> dict[int, Float[Tensor, " d_model"]]:
    """``{layer: multiple * spread_l * unit_l}``: at each layer, the unit trait vector times ``multiple`` standard
    deviations of the activations' projections on it (:func:`projection_spread`)."""
    out = {}
    for layer in layers:
        unit = vectors[layer].float() / vectors[layer].float().norm()
        out[layer] = float(multiple) * projection_spread(activations[:, layer], unit) * unit
    return out


def mean_score(scores: Sequence[float | None]) -> float | None:
    """The mean of the scores that are not None; None when every one is."""
    kept = [float(s) for s in scores if s is not None]
    return sum(kept) / len(kept) if kept else None


def steered_answers(model, tokenizer, prompts: Sequence[list[Message]], max_new_tokens: int, layer: int | None = None,
                    vector: Float[Tensor, " d_model"] | None = None, positions: Positions = "all") -> list[str]:
    """Greedy answers to ``prompts`` with ``vector`` added at block ``layer`` in a ``positions`` mode (none if None)."""
    if vector is None:
        return generate(model, tokenizer, list(prompts), max_new_tokens, temperature=0.0)
    with steering(model, {layer: vector}, positions=positions):
        return generate(model, tokenizer, list(prompts), max_new_tokens, temperature=0.0)


def layer_sweep(model, tokenizer, questions: Sequence[str], vectors: dict[int, Float[Tensor, " d_model"]],
                judge: Callable[[str, str], float | None], max_new_tokens: int) -> dict[int, float | None]:
    """Steer at each layer with its vector (every position), answer each question greedily (no system prompt), judge
    each answer, and return each layer's mean score over the answers the judge scored (None if it scored none)."""
    out = {}
    prompts = [chat_messages("", q) for q in questions]
    for layer, vector in vectors.items():
        answers = steered_answers(model, tokenizer, prompts, max_new_tokens, layer, vector, "all")
        out[layer] = mean_score([judge(q, a) for q, a in zip(questions, answers)])
    return out


def best_layer(scores: dict[int, float | None]) -> int | None:
    """The layer with the highest mean score (the lowest such layer on a tie); None when no layer has a score."""
    scored = [(s, -layer) for layer, s in scores.items() if s is not None]
    return -max(scored)[1] if scored else None


def candidate_layers(n_layers: int, table_layer: int | None = None, count: int = 5) -> list[int]:
    """``count`` layers spread evenly over 20-80% of the depth, plus the model table's layer, sorted and distinct."""
    if count < 1:
        raise ValueError(f"count must be >= 1; got {count}.")
    fractions = [0.5] if count == 1 else [0.2 + 0.6 * k / (count - 1) for k in range(count)]
    layers = {min(n_layers - 1, max(0, round(f * n_layers))) for f in fractions}
    if table_layer is not None:
        layers.add(table_layer)
    return sorted(layers)


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``"6, 10,15"`` -> ``[6, 10, 15]``; an error names a bad or out-of-range entry."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.lstrip("-").isdigit() or not 0 <= int(part) < n_layers:
            raise ValueError(f"COURSE_PART3_LAYERS: {part!r} is not a block index in 0..{n_layers - 1}.")
        out.append(int(part))
    if not out:
        raise ValueError("COURSE_PART3_LAYERS is empty: give comma-separated block indices, or unset it.")
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------------
# Monitoring: graded and many-shot prompts
# ---------------------------------------------------------------------------------------------------

GRADED_LEVELS = ("discourage", "helpful", "none", "name", "encourage")


def graded_system_prompts(trait: Trait, pair: int = 0) -> dict[str, str]:
    """Five system prompts from trait-discouraging to trait-encouraging, built from the trait's own instruction pair:
    the negative instruction, "You are a helpful assistant.", no system prompt, the trait's name alone, the positive
    instruction."""
    name = trait.name.replace("_", " ")
    return {"discourage": system_prompt(trait.name, trait.neg_prompts[pair], False),
            "helpful": "You are a helpful assistant.",
            "none": "",
            "name": f"You are {indefinite_article(name)} {name} assistant.",
            "encourage": system_prompt(trait.name, trait.pos_prompts[pair], True)}


def many_shot_prompt(question: str, shots: Sequence[tuple[str, str]]) -> list[Message]:
    """No system prompt; ``shots`` earlier (question, answer) exchanges, then ``question``."""
    messages: list[Message] = []
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r of two equally long sequences; None with fewer than 3 points or a constant sequence."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} and {len(y)}.")
    if len(x) < 3:
        return None
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    xs, ys = xs - xs.mean(), ys - ys.mean()
    denominator = float(xs.norm() * ys.norm())
    if denominator == 0.0:
        return None
    return float((xs * ys).sum()) / denominator


def monitoring_correlations(projections: Float[Tensor, " n"], scores: Sequence[float | None],
                            conditions: Sequence[str]) -> dict:
    """Pearson's r between the projections and the scores, over every point and within each condition.

    Points whose score is None are left out (pairwise). ``{"overall": r, "n": points, "within": {condition: r},
    "n_within": {condition: points}}``, conditions in first-seen order; an r is None with fewer than 3 points or
    no spread.
    """
    if not (len(projections) == len(scores) == len(conditions)):
        raise ValueError("projections, scores and conditions must have one entry per point.")
    keep = [i for i, s in enumerate(scores) if s is not None]
    x = [float(projections[i]) for i in keep]
    y = [float(scores[i]) for i in keep]
    out = {"overall": pearson(x, y), "n": len(keep), "within": {}, "n_within": {}}
    for condition in dict.fromkeys(conditions):
        idx = [k for k, i in enumerate(keep) if conditions[i] == condition]
        out["within"][condition] = pearson([x[k] for k in idx], [y[k] for k in idx])
        out["n_within"][condition] = len(idx)
    return out


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------

def cosine_matrix(vectors: dict[str, Float[Tensor, " d_model"]]) -> tuple[Float[Tensor, "n n"], list[str]]:
    """Raw (not centred) cosine similarity of every pair of vectors, float32, and their names in order."""
    names = list(vectors)
    stacked = torch.stack([vectors[n].float() for n in names])
    unit = stacked / stacked.norm(dim=-1, keepdim=True)
    return unit @ unit.T, names


def cosine_with_axis(trait_vectors_by_name: dict[str, Float[Tensor, "n_layers d_model"]],
                     axis: Float[Tensor, "n_layers d_model"], layers: dict[str, int]) -> dict[str, float]:
    """Each trait vector's cosine with the axis at the trait's own layer (both indexed by block)."""
    out = {}
    for name, vectors in trait_vectors_by_name.items():
        v, a = vectors[layers[name]].float(), axis[layers[name]].float()
        out[name] = float(v @ a / (v.norm() * a.norm()))
    return out


# ---------------------------------------------------------------------------------------------------
# Screening: toy datasets and projection differences
# ---------------------------------------------------------------------------------------------------

SCREEN_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def screening_mixes(n_questions: int, fractions: Sequence[float] = SCREEN_FRACTIONS, seed: int = 0,
                    ) -> dict[float, list[tuple[int, bool]]]:
    """Toy datasets: for each fraction, ``n_questions // 2`` distinct questions drawn at random (each mix its own draw),
    the first ``round(fraction * size)`` answered with the trait-prompted answer (``True``), the rest with a neutral
    one (``False``). ``{fraction: [(question index, trait?), ...]}``."""
    size = n_questions // 2
    if size < 1:
        raise ValueError(f"Screening needs at least 2 questions; got {n_questions}.")
    rng = random.Random(seed)
    out = {}
    for fraction in fractions:
        chosen = rng.sample(range(n_questions), size)
        n_trait = round(fraction * size)
        out[float(fraction)] = [(q, k < n_trait) for k, q in enumerate(chosen)]
    return out


def projection_differences(dataset: Float[Tensor, "n d_model"], own: Float[Tensor, "n d_model"],
                           prompt_last: Float[Tensor, "n d_model"], vector: Float[Tensor, " d_model"],
                           ) -> tuple[float, float]:
    """``(delta_p, delta_p_last)`` of one dataset, on the unit vector ``v = vector / |vector|``:

    - ``delta_p = mean_i (dataset_i - own_i) . v``: the dataset's answers against the model's own answers to the same
      prompts (response averages), the paper's projection difference;
    - ``delta_p_last = mean_i (dataset_i - prompt_last_i) . v``: the model's own answer stood in for by its last prompt
      token (no generation needed).
    """
    if not (dataset.shape == own.shape == prompt_last.shape) or dataset.ndim != 2:
        raise ValueError(f"dataset, own and prompt_last must all be [n, d_model]; got {tuple(dataset.shape)}, "
                         f"{tuple(own.shape)}, {tuple(prompt_last.shape)}.")
    unit = unit_vector(vector, dataset.shape[1], "vector")
    return float(((dataset.float() - own.float()) @ unit).mean()), float(((dataset.float() - prompt_last.float()) @ unit).mean())


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks on ties); None with fewer than 3 points or no spread."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    return pearson(ranks(list(x)), ranks(list(y)))


def finite_or_none(x: float | None) -> float | None:
    """``x`` if it is a finite number, else None (summaries refuse NaN)."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


def fmt(x: float | None, spec: str = "5.1f") -> str:
    """A number for a printed table, or ``"n/a"`` for None."""
    return "n/a" if x is None else format(float(x), spec)
