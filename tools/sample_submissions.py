"""Student-like submissions of a course part, built from its release and its solution notebook.

    python -m tools.sample_submissions OUT_DIR [--part part1_persona_space]

writes ``OUT_DIR/<student>.ipynb`` for each sample student. ``make instructor-roundtrip`` grades them
when given no submissions, and ``tests/test_nbgrader.py`` grades them and asserts the exact scores.

Every part has two:

- ``solution``: the solution notebook, as a student who pasted every solution would hand it in;
- ``blank``: the untouched release.

A part can add more in :data:`EDITS`: the release with every exercise answered from the solution notebook,
then some cells replaced (a new source) or deleted (``None``). For Part 1:

- ``rewritten``: seven exercises answered correctly but written differently (hooks instead of
  ``output_hidden_states``, ``executor.map``, ``F.normalize``, PCA's fit and a projection by hand, ...): full marks;
- ``mistakes``: three exercises wrong, one of them the batched extraction without the attention mask,
  which Exercise 5 calls: each costs only its own check's points (15 of 21). The student also edited the
  failing cosine check to ``pass`` and deleted the (passing) PCA check: nbgrader restores both, so
  tampering changes no score;
- ``broken``: a syntax error (Exercise 7), an endless retry loop (Exercise 2a: it fails its check after
  ``COURSE_CHECK_TIMEOUT`` seconds, and later cells that call it fail at once), and Exercise 8 deleted with
  its check (nbgrader puts the check back; it scores 0).
- ``delegating``: three exercises handed to the course's own implementations in ``utils``, one in each way
  the checks refuse (``tests/implementations.py``): Exercise 3's ``format_messages`` *is* the course's
  (imported under its name), Exercise 4b's batched extraction is an *alias* of the course's
  (``functools.partial(extract_mean_activations, ...)``), and Exercise 2b *calls* the course's
  ``run_parallel``. Each costs its own check (15 of 21), and the rest of the notebook runs.

For Part 2:

- ``rewritten``: seven exercises answered correctly but written differently (a forward hook in place of
  ``output_hidden_states``, ``np.percentile``, ``np.polyfit``, a context-manager class, ``ExitStack``,
  ``F.kl_div``, ...): full marks (11);
- ``mistakes``: three realistic mistakes, each costing only its own check (6 of 11): the block before
  ``layer`` (off by one, what ``hidden_states[layer]`` holds), a steering hook removed without ``try/finally`` (its check leaves a hook behind on the
  check's model, which later checks must not feel), and the KL the wrong way round.
- ``delegating``: as in Part 1, one exercise handed to ``utils`` in each way: ``cap_activations`` *is* the
  course's (Exercise 7's first half; the student's own ``activation_capping`` uses it), ``capping_threshold``
  is an *alias* of ``utils.steering.capping_thresholds``, and ``add_steering`` *calls* the course's
  ``steering`` through a helper of the student's (6 of 11).

:data:`LOST` says which check cells each student loses. The wrong and rewritten answers are written out
here or made by editing the solution's own source; the solution itself is read from ``solutions/``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable, Union

import nbformat

ROOT = Path(__file__).resolve().parent.parent

Edit = Union[str, Callable[[str], str], None]  # a new source, a function of the solution's source, or None: delete


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(source: str) -> str:
        if old not in source:
            raise ValueError(f"The solution no longer contains {old!r}: update tools/sample_submissions.py.")
        return source.replace(old, new)

    return edit


def _cut_from(marker: str, new: str) -> Callable[[str], str]:
    """The solution's source up to ``marker`` (a definition the student did not write), then ``new``."""
    def edit(source: str) -> str:
        if marker not in source:
            raise ValueError(f"The solution no longer contains {marker!r}: update tools/sample_submissions.py.")
        return source[:source.index(marker)] + new

    return edit


# --------------------------------------------------------------------------------------------------
# Part 1
# --------------------------------------------------------------------------------------------------

_P1_REWRITTEN = {
    "ex_generate_all": '''\
def generate_all_responses(client, model_name, personas, questions, max_workers=16, **generation_kwargs):
    import concurrent.futures as cf

    from tqdm.auto import tqdm

    keys = [(persona, q) for persona in personas for q in range(len(questions))]

    def one(key):
        persona, q = key
        try:
            return key, generate_response_api(client, model_name, personas[persona], questions[q],
                                              **generation_kwargs), None
        except Exception as e:
            return key, None, f"{type(e).__name__}: {e}"

    responses, failures = {}, {}
    with cf.ThreadPoolExecutor(max_workers) as pool:
        for key, text, error in tqdm(pool.map(one, keys), total=len(keys), desc="generate"):
            if error is None:
                responses[key] = text
            else:
                failures[key] = error
    return responses, failures
''',
    "ex_extract_batched": '''\
def extract_response_activations_batched(model, tokenizer, conversations, layer, batch_size=8):
    # A forward hook on the block instead of output_hidden_states; padding and masks built by hand.
    device = next(model.parameters()).device
    suffix = turn_suffix_len(tokenizer)
    captured = {}

    def hook(module, inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = model.model.layers[layer].register_forward_hook(hook)
    rows = []
    try:
        for b in range(0, len(conversations), batch_size):
            encoded = []
            for messages in conversations[b:b + batch_size]:
                text, start = format_messages(messages, tokenizer)
                ids = tokenizer(text, add_special_tokens=False).input_ids
                encoded.append((ids, start, len(ids) - suffix))
            width = max(len(ids) for ids, _, _ in encoded)
            input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros(len(encoded), width, dtype=torch.long)
            span = torch.zeros(len(encoded), width)
            for i, (ids, start, end) in enumerate(encoded):
                offset = width - len(ids) if tokenizer.padding_side == "left" else 0
                input_ids[i, offset:offset + len(ids)] = torch.tensor(ids)
                attention[i, offset:offset + len(ids)] = 1
                span[i, offset + start:offset + end] = 1
            with torch.inference_mode():
                model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
            hidden = captured["h"].float().cpu()
            rows.append((hidden * span[:, :, None]).sum(dim=1) / span.sum(dim=1, keepdim=True))
    finally:
        handle.remove()
    return torch.cat(rows)
''',
    "ex_cosine": '''\
import torch.nn.functional as F


def compute_cosine_similarity_matrix(persona_vectors):
    names = [name for name in persona_vectors]
    unit = F.normalize(torch.stack([persona_vectors[name].float() for name in names]), dim=-1)
    return torch.einsum("id,jd->ij", unit, unit), names


def compute_cosine_similarity_matrix_centered(persona_vectors):
    mean = torch.stack([v.float() for v in persona_vectors.values()]).mean(0)
    return compute_cosine_similarity_matrix({name: v.float() - mean for name, v in persona_vectors.items()})
''',
    "ex_pca": '''\
def pca_decompose_persona_vectors(persona_vectors):
    # Fit, then project by hand, instead of fit_transform.
    x = np.stack([v.double().cpu().numpy() for v in persona_vectors.values()])
    pca = PCA(n_components=2, svd_solver="full").fit(x)
    return (x - pca.mean_) @ pca.components_.T, pca
''',
    "ex_axis": '''\
def compute_assistant_axis(default_vectors, role_vectors):
    d = default_vectors.float().sum(dim=0) / len(default_vectors)
    r = role_vectors.float().sum(dim=0) / len(role_vectors)
    return torch.nn.functional.normalize(d - r, dim=0)


def characterize_axis(persona_vectors, assistant_axis):
    names = list(persona_vectors)
    stacked = torch.stack([persona_vectors[n].float() for n in names])
    cos = torch.nn.functional.cosine_similarity(stacked, assistant_axis.float()[None, :], dim=1)
    return {names[i]: cos[i].item() for i in torch.argsort(cos).tolist()}
''',
    "ex_trait": '''\
def compute_trait_vector(pos_activations, neg_activations):
    return torch.sub(pos_activations.float().mean(0), neg_activations.float().mean(0))
''',
    "ex_auc": '''\
def axis_auc(scores, positive):
    pairs = list(zip(scores.tolist(), positive.tolist()))
    pos = [s for s, p in pairs if p]
    neg = [s for s, p in pairs if not p]
    if not pos or not neg:
        raise ValueError("The AUC needs at least one example of each class.")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))
''',
}

_P1_MISTAKES = {
    # Forgets the attention mask: with Gemma's left padding the model attends to the padding.
    "ex_extract_batched": _replace("model(**enc, output_hidden_states=True)",
                                   "model(enc.input_ids, output_hidden_states=True)"),
    # "Centred" cosine that does not centre.
    "ex_cosine": _replace('centred = vectors - einops.reduce(vectors, "n_personas d_model -> d_model", "mean")',
                          "centred = vectors"),
    # The axis points away from the defaults.
    "ex_axis": _replace("axis = mean_default - mean_role", "axis = mean_role - mean_default"),
}

_P1_ENDLESS_RETRY = '''\
class EmptyResponseError(ValueError):
    """The model returned no text."""


def generate_response_api(client, model_name, system_prompt, question, max_tokens=128, temperature=0.7,
                          top_p=0.9):
    messages = []
    user_content = question
    if system_prompt.strip():
        if "gemma" in model_name.lower():
            user_content = f"{system_prompt}\\n\\n{question}"
        else:
            messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_content})
    while True:  # retry until the model says something: never ends if it keeps saying nothing
        completion = client.chat.completions.create(model=model_name, messages=messages, max_tokens=max_tokens,
                                                    temperature=temperature, top_p=top_p)
        text = (completion.choices[0].message.content or "").strip()
        if text:
            return text
'''

# Three exercises handed to the course's own implementations, one in each way the checks refuse.
_P1_DELEGATING = {
    # *is*: the course's function under the exercise's name.
    "ex_format": _cut_from("def format_messages(", "from utils.conversation import format_messages  # done already\n"),
    # an *alias*: a partial of the course's function.
    "ex_extract_batched": '''\
import functools

from utils.activations import extract_mean_activations

extract_response_activations_batched = functools.partial(extract_mean_activations, progress=False)
''',
    # *calls*: the student's own function, whose work is the course's run_parallel (imported by the notebook).
    "ex_generate_all": '''\
def generate_all_responses(client, model_name, personas, questions, max_workers=16, **generation_kwargs):
    def one(key):
        persona, q = key
        return generate_response_api(client, model_name, personas[persona], questions[q], **generation_kwargs)

    keys = [(persona, q) for persona in personas for q in range(len(questions))]
    return run_parallel(one, keys, max_workers=max_workers, desc="generate")
''',
}

# --------------------------------------------------------------------------------------------------
# Part 2
# --------------------------------------------------------------------------------------------------

_P2_REWRITTEN = {
    "ex_turn_projections": """\
def turn_projections(model, tokenizer, messages, axis, layer, max_tokens=8192):
    # A forward hook on the block instead of output_hidden_states; turns gathered in a dict.
    from utils.conversation import turn_windows

    unit = torch.nn.functional.normalize(axis.float().cpu(), dim=0)
    device = model.get_input_embeddings().weight.device
    captured, scores = {}, {}

    def hook(module, inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        for window in turn_windows(messages, tokenizer, max_tokens):
            with torch.no_grad():
                model(input_ids=torch.tensor([window.ids], device=device))
            h = captured["h"][0].float().cpu()
            for turn, (start, end) in zip(window.turns, window.spans):
                scores[turn] = torch.dot(h[start:end].mean(dim=0), unit)
    finally:
        handle.remove()
    return torch.stack([scores[t] for t in sorted(scores)])
""",
    "ex_capping_threshold": """\
def capping_threshold(projections, percentile=25.0):
    return {layer: float(np.percentile(p.double().numpy(), percentile)) for layer, p in projections.items()}
""",
    "ex_drift_summary": """\
def drift_summary(projections, threshold):
    y = projections.double().numpy()
    slope = float(np.polyfit(np.arange(len(y)), y, deg=1)[0])
    below = [i for i, value in enumerate(y.tolist()) if value < threshold]
    return slope, (below[0] if below else None)
""",
    "ex_add_steering": """\
class add_steering:
    # A class with __enter__ and __exit__ instead of @contextlib.contextmanager.
    def __init__(self, model, layer, vector, positions="all"):
        if positions not in ("all", "generated"):
            raise ValueError(f"positions must be 'all' or 'generated', got {positions!r}")
        self.block, self.vector, self.positions = model.model.layers[layer], vector, positions

    def _hook(self, module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        if self.positions == "generated" and kwargs.get("cache", kwargs.get("past_key_values")) is None:
            raise ValueError("positions='generated' needs KV-cached generation")
        if self.positions == "generated" and h.shape[1] > 1:
            return output
        h = h + self.vector.to(h.device, h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def __enter__(self):
        self.handle = self.block.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()
        return False
""",
    "ex_steering_vectors": """\
def steering_vectors(axis, projections, multiples):
    unit = torch.nn.functional.normalize(axis.float(), dim=0)
    return torch.outer(torch.as_tensor(list(multiples), dtype=torch.float32) * torch.std(projections.float()), unit)
""",
    "ex_capping": """\
def cap_activations(h, unit_axis, tau):
    # Lift only the rows below the floor, on a copy.
    a = unit_axis.float().to(h.device)
    proj = torch.einsum("...d,d->...", h.float(), a)
    below = proj < tau
    out = h.clone()
    out[below] = (h.float()[below] + (tau - proj[below])[:, None] * a).to(h.dtype)
    return out


@contextlib.contextmanager
def activation_capping(model, axes, thresholds, layers):
    def make_hook(layer):
        unit = torch.nn.functional.normalize(axes[layer].float(), dim=0)

        def hook(module, args, output):
            if isinstance(output, tuple):
                return (cap_activations(output[0], unit, thresholds[layer]), *output[1:])
            return cap_activations(output, unit, thresholds[layer])
        return hook

    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.callback(model.model.layers[layer].register_forward_hook(make_hook(layer)).remove)
        yield model
""",
    "ex_next_token_kl": """\
def next_token_kl(logits_p, logits_q):
    log_p = torch.nn.functional.log_softmax(logits_p.float(), dim=-1)
    log_q = torch.nn.functional.log_softmax(logits_q.float(), dim=-1)
    return torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
""",
}

_P2_MISTAKES = {
    # Off by one: the output of block layer - 1 (what hidden_states[layer] holds).
    "ex_turn_projections": _replace("model.model.layers[layer].register_forward_hook",
                                    "model.model.layers[layer - 1].register_forward_hook"),
    # No try/finally: a check that raises inside the block leaves the hook on its model.
    "ex_add_steering": _replace("    try:\n        yield\n    finally:\n        handle.remove()",
                                "    yield\n    handle.remove()"),
    # KL(Q || P) instead of KL(P || Q).
    "ex_next_token_kl": _replace("(log_p.exp() * (log_p - log_q))", "(log_q.exp() * (log_q - log_p))"),
}

# One exercise handed to the course's own implementations in each way the checks refuse.
_P2_DELEGATING = {
    # *is*: the course's cap_activations under the exercise's name (the student's activation_capping uses it).
    "ex_capping": _cut_from("def cap_activations(", '''\
from utils.steering import cap_activations  # the course's own


@contextlib.contextmanager
def activation_capping(model, axes, thresholds, layers):
    def make_hook(layer):
        unit = axes[layer].float() / axes[layer].float().norm()
        tau = float(thresholds[layer])

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            new = cap_activations(h, unit, tau)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(model.model.layers[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
'''),
    # an *alias*: the course's capping_thresholds under the exercise's name.
    "ex_capping_threshold": '''\
from utils.steering import capping_thresholds

capping_threshold = capping_thresholds
''',
    # *calls*: the student's context manager, whose work is the course's steering, through a helper of theirs.
    "ex_add_steering": '''\
from utils.steering import steering


def _steer_one_layer(model, layer, vector, positions):
    return steering(model, {layer: vector}, positions=positions)


@contextlib.contextmanager
def add_steering(model, layer, vector, positions="all"):
    with _steer_one_layer(model, layer, vector, positions):
        yield
''',
}

EDITS: dict[str, dict[str, dict[str, Edit]]] = {
    "part1_persona_space": {
        "rewritten": _P1_REWRITTEN,
        "mistakes": {**_P1_MISTAKES, "check_cosine": "pass", "check_pca": None},
        "broken": {
            "ex_generate_one": _P1_ENDLESS_RETRY,
            "ex_trait": _replace("return mean_pos - mean_neg", "return (mean_pos - mean_neg"),
            "ex_auc": None,
            "check_auc": None,
        },
        "delegating": _P1_DELEGATING,
    },
    "part2_stabilizing": {
        "rewritten": _P2_REWRITTEN,
        "mistakes": _P2_MISTAKES,
        "delegating": _P2_DELEGATING,
    },
}

LOST: dict[str, dict[str, set[str]]] = {
    "part1_persona_space": {
        "rewritten": set(),
        "mistakes": {"check_extract_batched", "check_cosine", "check_axis"},
        "broken": {"check_generate_one", "check_trait", "check_auc"},
        "delegating": {"check_format", "check_extract_batched", "check_generate_all"},
    },
    "part2_stabilizing": {
        "rewritten": set(),
        "mistakes": {"check_turn_projections", "check_add_steering", "check_next_token_kl"},
        "delegating": {"check_capping", "check_capping_threshold", "check_add_steering"},
    },
}

DELEGATED: dict[str, dict[str, tuple[str, str]]] = {
    "part1_persona_space": {
        "check_format": ("utils.conversation.format_messages", "is that function itself"),
        "check_extract_batched": ("utils.activations.extract_mean_activations", "functools.partial"),
        "check_generate_all": ("utils.runtime.run_parallel", "Your generate_all_responses calls it"),
    },
    "part2_stabilizing": {
        "check_capping": ("utils.steering.cap_activations", "is that function itself"),
        "check_capping_threshold": ("utils.steering.capping_thresholds", "is that function itself"),
        "check_add_steering": ("utils.steering.steering", "calls it while the check runs (from your _steer_one_layer"),
    },
}
"""The ``delegating`` students' lost check cells: the course function each failure names, and a piece of how."""

MISTAKES: dict[str, dict[str, dict[str, tuple[str, str]]]] = {
    "part1_persona_space": {
        "mistakes": {"check_extract_batched": ("test_extract_response_activations_batched", "_EX_PADDING"),
                     "check_cosine": ("test_compute_cosine_similarity_matrix_centered", "_CEN_VALUES"),
                     "check_axis": ("test_compute_assistant_axis", "_AXIS_VALUES")},
        "broken": {"check_generate_one": ("test_generate_response_api", "time-limit")},
        "delegating": {"check_format": ("test_format_messages_response_index", "delegates"),
                       "check_extract_batched": ("test_extract_response_activations_batched", "delegates"),
                       "check_generate_all": ("test_generate_all_responses", "delegates")},
    },
    "part2_stabilizing": {
        "mistakes": {"check_turn_projections": ("test_turn_projections", "_TP_VALUES"),
                     "check_add_steering": ("test_add_steering", "_ST_REMOVED"),
                     "check_next_token_kl": ("test_next_token_kl", "_KL_DIRECTION")},
        "delegating": {"check_capping": ("test_cap_activations", "delegates"),
                       "check_capping_threshold": ("test_capping_threshold", "delegates"),
                       "check_add_steering": ("test_add_steering", "delegates")},
    },
    "part3_trait_vectors": {
        "mistakes": {"check_judge": ("test_logprob_score", "_LS_VALUES"),
                     "check_effective_pairs": ("test_effective_pairs", "_EP_RULES"),
                     "check_steer_positions": ("test_steer_positions", "_SP_MODES")},
        "delegating": {"check_effective_pairs": ("test_effective_pairs", "delegates"),
                       "check_projection_differences": ("test_projection_differences", "delegates"),
                       "check_monitoring": ("test_monitoring_correlations", "delegates")},
    },
}
"""The named mistake (``tests/checking.py``'s identifier) each sample student's lost check cells fail with: the
check that fails and either the name of its stage's label in the part's checks module (``_EX_PADDING``) or the
kind of failure that is no stage's own (``time-limit``: a function that never returns; ``delegates``: an answer
that hands the work to the course's own implementation). The other lost cells fail without a check's verdict
(not written, or a name the notebook never defined: a syntax error, a deleted exercise). The class report
(``tools/class_report.py``) must count exactly these."""
"""Check cells (grade ids) each sample student loses all points of; every other check gets full points.
``blank`` loses every check; ``solution`` none."""


def students(part: str) -> list[str]:
    return ["solution", "blank", *EDITS.get(part, {})]


def lost(part: str, student: str, checks: list[str]) -> set[str]:
    if student == "blank":
        return set(checks)
    return set(LOST.get(part, {}).get(student, set()))


def _grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def answered(release: nbformat.NotebookNode, solution: nbformat.NotebookNode,
             edits: dict[str, Edit]) -> nbformat.NotebookNode:
    """The release with every exercise answered from ``solution``, then ``edits`` applied."""
    nb = copy.deepcopy(release)
    solved = {_grade_id(c): c.source for c in solution.cells}
    unknown = set(edits) - {_grade_id(c) for c in nb.cells}
    if unknown:
        raise ValueError(f"No cells {sorted(unknown)} in the release: update tools/sample_submissions.py.")
    cells = []
    for cell in nb.cells:
        gid = _grade_id(cell)
        if cell.metadata.get("nbgrader", {}).get("solution"):
            cell.source = solved[gid]
        if gid in edits:
            edit = edits[gid]
            if edit is None:
                continue
            cell.source = edit(cell.source) if callable(edit) else edit
        cells.append(cell)
    nb.cells = cells
    return nb


def build(part: str, release: Path, out_dir: Path, prefix: str = "",
          only: list[str] | None = None) -> dict[str, Path]:
    """Write each sample student's notebook to ``out_dir/<prefix><student>.ipynb``; return student -> path.

    ``only``: these students (default: all of :func:`students`)."""
    from tools.build_notebooks import solution_notebook

    wanted = students(part) if only is None else list(only)
    unknown = set(wanted) - set(students(part))
    if unknown:
        raise ValueError(f"No sample students {sorted(unknown)} for {part}; there are {students(part)}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    handed_out = nbformat.read(release, as_version=4)
    solution = solution_notebook(part)
    given = {"solution": solution, "blank": handed_out}
    notebooks = {student: given[student] if student in given else answered(handed_out, solution, EDITS[part][student])
                 for student in wanted}
    paths = {}
    for student, nb in notebooks.items():
        path = out_dir / f"{prefix}{student}.ipynb"
        nbformat.write(nb, path)
        paths[f"{prefix}{student}"] = path
    return paths


# --------------------------------------------------------------------------------------------------
# Part 3 (its own block: the students below are registered in EDITS and LOST at its end)
#
# - ``rewritten``: all ten exercises answered correctly but written differently (string.Template, a dict of numbers,
#   NaN comparisons, one left-padded batch with masks, numpy's std, a hand-written hook, torch.where, corrcoef,
#   einsum, ignore_index=-100): full marks (15);
# - ``mistakes``: three realistic mistakes, each costing only its own check (10 of 15): the judge's weighted mean not
#   divided by the integer tokens' mass, a negative answer kept at exactly the threshold, and "response" steering
#   every position.
# - ``delegating``: one exercise handed to ``utils`` in each refused way: ``effective_pairs`` *is* the course's,
#   ``projection_differences`` is an *alias* (``functools.partial``) of it, and ``monitoring_correlations`` *calls* the
#   course's through a helper of the student's (12 of 15).
# --------------------------------------------------------------------------------------------------

_P3_REWRITTEN = {
    "ex_contrastive_prompts": '''\
def contrastive_prompts(trait, n_pairs):
    # string.Template, and the article from a set of vowels.
    from string import Template

    if n_pairs not in range(1, 6):
        raise ValueError(f"n_pairs must be 1..5, not {n_pairs}")
    template = Template("You are $article $name assistant. $instruction")
    name = " ".join(trait.name.split("_"))
    article = "an" if name[0].lower() in set("aeiou") else "a"
    return [(template.substitute(article=article, name=name, instruction=trait.pos_prompts[i]),
             template.substitute(article="a", name="helpful", instruction=trait.neg_prompts[i]))
            for i in range(n_pairs)]


def split_questions(questions):
    if len(questions) != 40:
        raise ValueError("a trait file has 40 questions")
    head, tail = [], []
    for i, q in enumerate(questions):
        (head if i < 20 else tail).append(q)
    return head, tail
''',
    "ex_judge": '''\
def logprob_score(top_logprobs, min_mass=0.25):
    # The probability of each number gathered in a dict first.
    import math
    import re

    probs = {}
    for token, logprob in top_logprobs:
        t = token.strip()
        if re.fullmatch(r"[0-9]+", t) and int(t) <= 100:
            probs[int(t)] = probs.get(int(t), 0.0) + math.exp(logprob)
    mass = sum(probs.values())
    return None if mass < min_mass else sum(n * p for n, p in probs.items()) / mass


def judge_0_100(client, judge_model, prompt):
    request = dict(model=judge_model, messages=[{"role": "user", "content": prompt}], max_tokens=1, temperature=0,
                   logprobs=True, top_logprobs=20)
    first = client.chat.completions.create(**request).choices[0].logprobs.content[0]
    return logprob_score([(getattr(a, "token"), getattr(a, "logprob")) for a in first.top_logprobs])
''',
    "ex_effective_pairs": '''\
def effective_pairs(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold=50.0, coherence_threshold=50.0):
    # NaN stands for "no score": every comparison with NaN is False.
    columns = [pos_scores, neg_scores, pos_coherence, neg_coherence]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("one entry per pair in every list")
    p, n, pc, nc = (np.array([np.nan if x is None else x for x in c], dtype=float) for c in columns)
    with np.errstate(invalid="ignore"):
        keep = (p >= threshold) & (n < threshold) & (pc >= coherence_threshold) & (nc >= coherence_threshold)
    return torch.from_numpy(keep)
''',
    "ex_three_averages": '''\
def three_averages(model, tokenizer, conversations):
    # All conversations in one left-padded batch, with an attention mask and position ids, and masks per span.
    from utils.conversation import response_token_span

    spans = [response_token_span(m, tokenizer) for m in conversations]
    width = max(end for _, _, end in spans)
    n, n_layers = len(spans), len(model.model.layers)
    ids = torch.zeros(n, width, dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.long)
    masks = {k: torch.zeros(n, width) for k in ("response_avg", "prompt_avg", "prompt_last")}
    for row, (tokens, start, end) in enumerate(spans):
        offset = width - end
        ids[row, offset:] = torch.tensor(tokens[:end])
        attention[row, offset:] = 1
        masks["response_avg"][row, offset + start:offset + end] = 1
        masks["prompt_avg"][row, offset:offset + start] = 1
        masks["prompt_last"][row, offset + start - 1] = 1
    store = {}
    handles = [block.register_forward_hook(lambda m, a, o, l=l: store.__setitem__(l, o[0] if isinstance(o, tuple) else o))
               for l, block in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
    finally:
        for handle in handles:
            handle.remove()
    stacked = torch.stack([store[l].float() for l in range(n_layers)], dim=1)  # [n, layers, seq, d]
    return {k: torch.einsum("nlsd,ns->nld", stacked, m) / m.sum(1)[:, None, None] for k, m in masks.items()}


def trait_vector(pos, neg):
    return torch.sub(pos.to(torch.float32).mean(0), neg.to(torch.float32).mean(0))
''',
    "ex_layer_sweep": '''\
def spread_scaled_vectors(vectors, activations, layers, multiple):
    out = {}
    for layer in layers:
        v = vectors[layer].double().numpy()
        unit = v / np.linalg.norm(v)
        spread = np.std(activations[:, layer].double().numpy() @ unit, ddof=1)
        out[layer] = torch.from_numpy(multiple * spread * unit).float()
    return out


def layer_sweep(model, tokenizer, questions, vectors, judge, max_new_tokens):
    # Its own forward hook, removed in finally.
    means = {}
    for layer, vec in vectors.items():
        def add(module, args, output, vec=vec):
            if isinstance(output, tuple):
                return (output[0] + vec.to(output[0].dtype),) + tuple(output[1:])
            return output + vec.to(output.dtype)
        handle = model.model.layers[layer].register_forward_hook(add)
        try:
            answers = generate(model, tokenizer, [[{"role": "user", "content": q}] for q in questions], max_new_tokens,
                               temperature=0.0)
        finally:
            handle.remove()
        scored = [s for s in map(judge, questions, answers) if s is not None]
        means[layer] = float(np.mean(scored)) if scored else None
    return means
''',
    "ex_steer_positions": '''\
def steer_positions(h, vector, positions):
    # A boolean position mask and torch.where.
    if positions not in {"all", "prompt", "response"}:
        raise ValueError(f"unknown positions {positions!r}")
    seq = h.shape[1]
    if positions == "all":
        mask = torch.ones(seq, dtype=torch.bool)
    elif positions == "prompt":
        mask = torch.full((seq,), seq > 1)
    else:
        mask = torch.arange(seq) == seq - 1
    return torch.where(mask.to(h.device)[None, :, None], h + vector.to(h.device, h.dtype), h)
''',
    "ex_monitoring": '''\
def monitoring_correlations(projections, scores, conditions):
    keep = np.array([s is not None for s in scores])
    x = projections.double().numpy()[keep]
    y = np.array([s for s in scores if s is not None], dtype=float)
    c = np.array(conditions, dtype=object)[keep]

    def r(a, b):
        if len(a) < 3 or a.std() == 0 or b.std() == 0:
            return None
        return float(np.corrcoef(a, b)[0, 1])

    within = {name: r(x[c == name], y[c == name]) for name in dict.fromkeys(conditions)}
    counts = {name: int((c == name).sum()) for name in dict.fromkeys(conditions)}
    return {"overall": r(x, y), "n": int(keep.sum()), "within": within, "n_within": counts}
''',
    "ex_geometry": '''\
def cosine_matrix(vectors):
    names = list(vectors)
    unit = torch.nn.functional.normalize(torch.stack([vectors[n].float() for n in names]), dim=-1)
    return torch.einsum("id,jd->ij", unit, unit), names


def cosine_with_axis(trait_vectors_by_name, axis, layers):
    return {name: torch.nn.functional.cosine_similarity(v[layers[name]].float(), axis[layers[name]].float(), dim=0).item()
            for name, v in trait_vectors_by_name.items()}
''',
    "ex_projection_differences": '''\
def projection_differences(dataset, own, prompt_last, vector):
    unit = torch.nn.functional.normalize(vector.float(), dim=0)
    return (torch.einsum("nd,d->n", dataset.float() - own.float(), unit).mean().item(),
            torch.einsum("nd,d->n", dataset.float() - prompt_last.float(), unit).mean().item())
''',
    "ex_preventative_loss": '''\
def preventative_loss(model, batch, layer=None, vector=None):
    # Labels with -100 outside the answers, cross_entropy's mean over the rest.
    import contextlib

    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)[:, 1:]
    context = steering(model, {layer: vector}) if vector is not None else contextlib.nullcontext()
    with context:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)
''',
}

_P3_MISTAKES = {
    # The weighted mean not divided by the integer tokens' mass.
    "ex_judge": _replace("return weighted / mass if mass >= min_mass else None",
                         "return weighted if mass >= min_mass else None"),
    # The negative kept at exactly the threshold (<= instead of <).
    "ex_effective_pairs": _replace("n is not None and n < threshold", "n is not None and n <= threshold"),
    # "response" steers every position, like "all".
    "ex_steer_positions": _replace('if positions == "all" or (positions == "prompt" and h.shape[1] > 1):',
                                   'if positions in ("all", "response") or (positions == "prompt" and h.shape[1] > 1):'),
}

_P3_DELEGATING = {
    # *is*: the course's filter under the exercise's name.
    "ex_effective_pairs": '''\
from utils.traits import effective_pairs  # the course's own
''',
    # an *alias*: a functools.partial of the course's projection differences.
    "ex_projection_differences": '''\
import functools

import utils.traits

projection_differences = functools.partial(utils.traits.projection_differences)
''',
    # *calls*: the student's function hands the work to the course's through a helper of theirs.
    "ex_monitoring": '''\
from utils import traits as _course


def _correlate(projections, scores, conditions):
    return _course.monitoring_correlations(projections, scores, conditions)


def monitoring_correlations(projections, scores, conditions):
    return _correlate(projections, scores, conditions)
''',
}

EDITS["part3_trait_vectors"] = {"rewritten": _P3_REWRITTEN, "mistakes": _P3_MISTAKES, "delegating": _P3_DELEGATING}
LOST["part3_trait_vectors"] = {"rewritten": set(),
                               "mistakes": {"check_judge", "check_effective_pairs", "check_steer_positions"},
                               "delegating": {"check_effective_pairs", "check_projection_differences",
                                              "check_monitoring"}}
DELEGATED["part3_trait_vectors"] = {
    "check_effective_pairs": ("utils.traits.effective_pairs", "is that function itself"),
    "check_projection_differences": ("utils.traits.projection_differences", "functools.partial"),
    "check_monitoring": ("utils.traits.monitoring_correlations",
                         "calls it while the check runs (from your _correlate"),
}


def main(argv: list[str] | None = None) -> int:
    from tools.build_notebooks import PARTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--part", default=PARTS[0], choices=PARTS)
    args = parser.parse_args(argv)
    release = ROOT / "exercises" / f"{args.part}.ipynb"
    for student, path in build(args.part, release, args.out_dir).items():
        print(f"{student:12s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
