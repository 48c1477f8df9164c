"""The whole experiment at any scale, resumable: ``python -m utils.pipeline --model ... --roles all ...``.

Stages, as in the paper's pipeline:

1. **generate**: every (persona, system prompt, question) answered, by the API or the local model;
2. **judge**: every role response scored 0-3 with the role's own judge prompt from the paper;
3. **extract**: the mean activation over each response's content tokens, at the chosen layer(s);
4. **vectors**: per role, the mean over score-3 responses (at least ``--min-count`` of them); the
   default vector over all default responses;
5. **axis**: mean(default) - mean(roles).
6. **axes** (capping): per layer, the default responses' mean activations projected on the unit axis
   and their ``--percentile`` (the paper: 25th) as the capping threshold. Runs after stage 5, or alone
   with ``--stage axes`` once stages 1-5 are done.

Everything is cached under ``--cache-dir`` (default ``.cache/pipeline/<model>/``), keyed by model,
persona, prompt index and question index; each response and judgement record also carries a tag of the
generation settings (backend, max tokens, temperature, top-p, seed, and locally the generation dtype,
sampler version and chunk size), and records made with other settings are not reused. Stop a run at
any point (Ctrl-C, a crash, a killed machine) and run the same command again: finished work is read back, only the rest is done, and the
results are identical to an uninterrupted run. Local generation and extraction work in fixed chunks
with fixed seeds, so a chunk redone after a crash gives the same text and numbers.

API calls run concurrently, retry 429s, 5xx, timeouts and malformed replies with exponential
backoff, and a call that still fails is recorded with its error. Nothing is dropped silently: the
summary counts every failure, and a failed item is retried on the next run.

Outputs (``--out``, default ``out/pipeline/<model>/``): ``role_vectors.safetensors`` (one tensor per
role, ``[n_layers, d_model]`` float32), ``default_vector.safetensors``, ``axis.safetensors`` and
``summary.json``; stage 6 adds ``capping.safetensors`` (``axis`` ``[n_layers, d_model]``, ``axis_unit``,
``thresholds`` ``[n_layers]``) and ``capping.json`` (layers, percentile, thresholds). Load them with
``safetensors.torch.load_file``; no pickle is involved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from utils.activations import extract_mean_activations
from utils.conversation import chat_messages, merge_system_prompt, supports_system_role
from utils.data import load_default_prompts, load_questions, load_roles
from utils.generation import SAMPLER_VERSION, generate
from utils.judges import (DEFAULT_JUDGE_MODEL, MalformedReply, OfflineRuleJudge, PermanentFailure, call_with_retries,
                          completion_text, make_api_client, parse_score)
from utils.models import (PROJECT_ROOT, default_layer, dtype_for, load_model, load_tokenizer, model_n_layers,
                          short_model_name)
from utils.runtime import run_parallel
from utils.steering import capping_thresholds

DEFAULT = "default"


@dataclass(frozen=True, order=True)
class Item:
    """One response to produce: persona (a role name or "default"), prompt index, question index."""

    persona: str
    prompt: int
    question: int

    @property
    def key(self) -> str:
        return f"{self.persona}|{self.prompt}|{self.question}"

    @staticmethod
    def from_key(key: str) -> Item:
        persona, prompt, question = key.rsplit("|", 2)
        return Item(persona, int(prompt), int(question))


# ---------------------------------------------------------------------------------------------------
# The cache: append-only JSON lines, one record per item, written under a lock and flushed at once.
# ---------------------------------------------------------------------------------------------------

class JsonlStore:
    """``key -> record`` persisted as JSON lines. The last record for a key wins; a torn last line
    (a crash mid-write) is ignored. With a ``tag``, records are stamped with it, and records with
    another tag are ignored on load."""

    def __init__(self, path: Path, tag: str | None = None):
        self.path, self.tag = path, tag
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if tag is not None and record.get("gen") != tag:
                    continue  # made with other generation settings: never mixed in
                self.records[record["key"]] = record
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, record: dict) -> None:
        if self.tag is not None:
            record = {**record, "gen": self.tag}
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            with self.path.open("a") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.records[record["key"]] = record

    def ok(self, key: str) -> bool:
        return "error" not in self.records.get(key, {"error": "missing"})


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

@dataclass
class Config:
    """A run. ``question_ids`` picks questions by index (default the first ``n_questions``);
    ``n_default_prompts`` the default prompts used (default ``n_prompts``)."""

    model: str
    roles: list[str]
    n_questions: int
    n_prompts: int
    layers: list[int]
    backend: str = "local"  # or "api"
    judge: str = "offline"  # or "api"
    generation_model: str | None = None
    judge_model: str = DEFAULT_JUDGE_MODEL
    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    min_score: int = 3
    min_count: int = 50
    workers: int = 16
    chunk_size: int = 32
    limit: int | None = None
    cache_dir: Path = PROJECT_ROOT / ".cache" / "pipeline"
    out_dir: Path = PROJECT_ROOT / "out" / "pipeline"
    seed: int = 0
    cap_percentile: float = 25.0  # stage 6: the capping threshold's percentile of default projections
    stage: str = "all"  # "axes": main() runs only stage 6
    question_ids: list[int] | None = None
    n_default_prompts: int | None = None

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1; got {self.chunk_size}.")
        if not 0.0 < self.cap_percentile < 100.0:
            raise ValueError(f"cap_percentile must be in (0, 100); got {self.cap_percentile}.")
        if self.question_ids is not None and len(self.question_ids) != self.n_questions:
            raise ValueError(f"question_ids has {len(self.question_ids)} ids but n_questions is {self.n_questions}.")


def settings_key(settings: dict) -> str:
    """A short, stable tag for a dict of generation settings (for cache keys)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _chunk_seed(seed: int, keys: list[str]) -> int:
    return seed + int(hashlib.sha256("\n".join(keys).encode()).hexdigest()[:8], 16)


def _generation_key(cfg: Config, model=None) -> str:
    """A tag for every setting that changes the generated text, so a change never mixes results in the cache."""
    settings = {"backend": cfg.backend, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "seed": cfg.seed}
    if cfg.question_ids is not None:
        settings["question_ids"] = list(cfg.question_ids)
    if cfg.backend == "local":
        if model is not None:
            dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        else:
            dtype = dtype_for(cfg.model).name
        settings.update(dtype=dtype, sampler=SAMPLER_VERSION, chunk_size=cfg.chunk_size)
    else:
        settings["generation_model"] = cfg.generation_model or cfg.model
    return settings_key(settings)


class Pipeline:
    """Holds a run's configuration, caches and (lazily) the model and clients."""

    def __init__(self, cfg: Config, model=None, tokenizer=None, generation_client=None, judge_client=None,
                 progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self._model, self._tokenizer = model, tokenizer
        self._generation_client, self._judge_client = generation_client, judge_client
        self.cache = cfg.cache_dir / _slug(cfg.model)
        self.out = cfg.out_dir / _slug(cfg.model)
        self.generation_tag = _generation_key(cfg, model)
        self.responses = JsonlStore(self.cache / "responses.jsonl", self.generation_tag)
        self.judgements = JsonlStore(self.cache / "judgements.jsonl", self.generation_tag)
        self.roles = load_roles()
        unknown = [r for r in cfg.roles if r not in self.roles]
        if unknown:
            raise ValueError(f"Unknown role(s): {unknown}. See data/roles/role_list.json for the 275 names.")
        questions = load_questions()
        self.questions = ([questions[i] for i in cfg.question_ids] if cfg.question_ids is not None
                          else list(questions[: cfg.n_questions]))
        self.default_prompts = load_default_prompts(short_model_name(cfg.model))
        self.defaults = list(self.default_prompts.values())
        self.seconds: dict[str, float] = {}

    # -- lazily loaded resources -------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            self._model, self._tokenizer = load_model(self.cfg.model)
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # only the tokenizer is needed (API generation): don't load the weights
            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    def system_prompt(self, item: Item) -> str:
        prompts = self.defaults if item.persona == DEFAULT else self.roles[item.persona].system_prompts
        return prompts[item.prompt]

    def items(self) -> list[Item]:
        cfg = self.cfg
        n_defaults = cfg.n_prompts if cfg.n_default_prompts is None else cfg.n_default_prompts
        items = [Item(DEFAULT, p, q) for p in range(min(n_defaults, len(self.defaults)))
                 for q in range(len(self.questions))]
        items += [Item(r, p, q) for r in cfg.roles for p in range(cfg.n_prompts) for q in range(len(self.questions))]
        items.sort()
        return items[: cfg.limit] if cfg.limit else items

    def conversation(self, item: Item, response: str | None = None) -> list[dict]:
        return chat_messages(self.system_prompt(item), self.questions[item.question], response)

    # -- stage 1: generate -------------------------------------------------------------------------
    def generate(self) -> None:
        todo = [it for it in self.items() if not self.responses.ok(it.key)]
        if not todo:
            return
        if self.cfg.backend == "local":
            self._generate_local(todo)
        else:
            self._generate_api(todo)

    def _generate_local(self, todo: list[Item]) -> None:
        # Fixed chunks of the full sorted item list, so a chunk redone after a crash is the same batch.
        all_items = self.items()
        chunks = [all_items[i:i + self.cfg.chunk_size] for i in range(0, len(all_items), self.cfg.chunk_size)]
        pending = set(todo)
        bar = tqdm(total=len(todo), desc="1/5 generate (local)", disable=not self.progress)
        for chunk in chunks:
            if not pending.intersection(chunk):
                continue
            keys = [it.key for it in chunk]
            texts = generate(self.model, self.tokenizer, [self.conversation(it) for it in chunk],
                             self.cfg.max_tokens, self.cfg.temperature, self.cfg.top_p,
                             seed=_chunk_seed(self.cfg.seed, keys))
            for item, text in zip(chunk, texts):
                if item not in pending:
                    continue
                record = {"key": item.key, "response": text} if text else {
                    "key": item.key, "error": "EmptyResponse: the model produced no text"}
                self.responses.put(record)
                bar.update(1)
        bar.close()

    def _generate_api(self, todo: list[Item]) -> None:
        client = self._generation_client or make_api_client(max_retries=0)  # retries happen here, with backoff
        model_name = self.cfg.generation_model or self.cfg.model
        # The system prompt is merged into the first user turn exactly when the template of the model whose
        # activations are read (cfg.model) rejects a system role, as in every other path.
        system_supported = supports_system_role(self.tokenizer)

        def one(item: Item) -> None:
            messages = merge_system_prompt(self.conversation(item), system_supported)

            def call() -> str:
                text = completion_text(client.chat.completions.create(
                    model=model_name, messages=messages, max_tokens=self.cfg.max_tokens,
                    temperature=self.cfg.temperature, top_p=self.cfg.top_p))
                if not text.strip():
                    raise MalformedReply("empty response")
                return text.strip()

            _record(self.responses, item.key, "response", call)

        _run_threads(one, todo, self.cfg.workers, "1/5 generate (api)", self.progress)

    # -- stage 2: judge ----------------------------------------------------------------------------
    def judge(self) -> None:
        todo = [it for it in self.items() if it.persona != DEFAULT and self.responses.ok(it.key)
                and not self.judgements.ok(it.key)]
        if not todo:
            return
        if self._judge_client is not None:
            client = self._judge_client
        elif self.cfg.judge == "api":
            client = make_api_client(max_retries=0)  # retries happen here, with backoff
        else:
            client = OfflineRuleJudge()

        def one(item: Item) -> None:
            prompt = self.roles[item.persona].judge_prompt.format(
                question=self.questions[item.question], answer=self.responses.records[item.key]["response"])

            def call() -> int:
                return parse_score(completion_text(client.chat.completions.create(
                    model=self.cfg.judge_model, messages=[{"role": "user", "content": prompt}], max_tokens=16,
                    temperature=0.0)), "a role score")

            _record(self.judgements, item.key, "score", call)

        _run_threads(one, todo, self.cfg.workers, "2/5 judge", self.progress)

    # -- stage 3: extract --------------------------------------------------------------------------
    def _activation_chunks(self) -> list[list[Item]]:
        usable = [it for it in self.items() if self.responses.ok(it.key)]
        return [usable[i:i + 256] for i in range(0, len(usable), 256)]

    def _chunk_path(self, chunk: list[Item]) -> Path:
        digest = hashlib.sha256("\n".join(
            f"{it.key}\t{self.responses.records[it.key]['response']}" for it in chunk).encode()).hexdigest()[:16]
        layers = "-".join(map(str, self.cfg.layers))
        return self.cache / "activations" / f"L{layers}_{digest}.safetensors"

    def extract(self) -> None:
        chunks = [c for c in self._activation_chunks() if not self._chunk_path(c).exists()]
        bar = tqdm(total=sum(map(len, chunks)), desc="3/5 extract", disable=not self.progress)
        for chunk in chunks:
            convs = [self.conversation(it, self.responses.records[it.key]["response"]) for it in chunk]
            acts = extract_mean_activations(self.model, self.tokenizer, convs, self.cfg.layers, progress=False)
            path = self._chunk_path(chunk)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({it.key: acts[i].contiguous() for i, it in enumerate(chunk)}, str(tmp))
            tmp.rename(path)  # atomic: a chunk file is either complete or absent
            bar.update(len(chunk))
        bar.close()

    def activations(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for chunk in self._activation_chunks():
            out.update(load_file(str(self._chunk_path(chunk))))
        return out

    # -- stages 4 and 5: vectors and axis ----------------------------------------------------------
    def vectors_and_axis(self) -> dict:
        acts = self.activations()
        default_keys = [k for k in acts if Item.from_key(k).persona == DEFAULT]
        if not default_keys:
            raise RuntimeError("No default responses survived generation; the axis needs them. See the failures.")
        default_vector = torch.stack([acts[k] for k in default_keys]).mean(0)
        role_vectors, too_few = {}, {}
        for role in self.cfg.roles:
            keys = [k for k in acts if Item.from_key(k).persona == role and self.judgements.ok(k)
                    and self.judgements.records[k]["score"] >= self.cfg.min_score]
            if len(keys) >= self.cfg.min_count:
                role_vectors[role] = torch.stack([acts[k] for k in keys]).mean(0)
            else:
                too_few[role] = len(keys)
        self.out.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.cfg.model, "layers": json.dumps(self.cfg.layers),
                "convention": "layer i = output of model.model.layers[i] = hidden_states[i + 1]"}
        save_file({"vector": default_vector.contiguous()}, str(self.out / "default_vector.safetensors"), metadata=meta)
        summary: dict = {"roles_with_vectors": len(role_vectors), "roles_below_min_count": too_few}
        if role_vectors:
            save_file({r: v.contiguous() for r, v in role_vectors.items()}, str(self.out / "role_vectors.safetensors"),
                      metadata=meta)
            axis = default_vector - torch.stack(list(role_vectors.values())).mean(0)
            save_file({"axis": axis.contiguous(), "axis_unit": (axis / axis.norm(dim=-1, keepdim=True)).contiguous()},
                      str(self.out / "axis.safetensors"), metadata=meta)
        else:
            summary["axis"] = (f"not computed: no role has {self.cfg.min_count} responses with score >= "
                               f"{self.cfg.min_score} (lower --min-count for small runs)")
        return summary

    # -- stage 6: capping axes and thresholds (Part 2) ---------------------------------------------
    def capping_axes(self) -> dict:
        """Per-layer axes and capping thresholds, from stage 5's axis and the default responses.

        For every layer in ``cfg.layers``: the unit axis ``axis / |axis|``, each default response's mean
        activation projected on it, and the ``cfg.cap_percentile`` percentile of those projections
        (:func:`utils.steering.capping_thresholds`; the paper's p0.25 is 25). Writes
        ``capping.safetensors`` (``axis`` and ``axis_unit`` ``[n_layers, d_model]``, ``thresholds``
        ``[n_layers]``, float32, rows in the order of ``layers``) and ``capping.json`` (model, layers,
        percentile, thresholds by layer, number of default responses).

        Raises:
            RuntimeError: stage 5 has not written ``axis.safetensors``, or no default response has activations.
        """
        axis_path = self.out / "axis.safetensors"
        if not axis_path.exists():
            raise RuntimeError(f"{axis_path} is missing: run stages 1-5 first (the same command without "
                               "--stage axes), with enough responses for an axis.")
        axis = load_file(str(axis_path))["axis"]  # [n_layers, d_model], rows in cfg.layers order
        if axis.shape[0] != len(self.cfg.layers):
            raise RuntimeError(f"{axis_path} has {axis.shape[0]} layers but --layers gives {len(self.cfg.layers)}; "
                               "run stages 1-5 again with these layers.")
        acts = self.activations()
        default_keys = [k for k in acts if Item.from_key(k).persona == DEFAULT]
        if not default_keys:
            raise RuntimeError("No default response has activations; the thresholds need them.")
        unit = axis / axis.norm(dim=-1, keepdim=True)
        defaults = torch.stack([acts[k] for k in sorted(default_keys)])  # [n_default, n_layers, d_model]
        projections = torch.einsum("nld,ld->nl", defaults.float(), unit.float())
        taus = capping_thresholds({layer: projections[:, i] for i, layer in enumerate(self.cfg.layers)},
                                  self.cfg.cap_percentile)
        thresholds = torch.tensor([taus[layer] for layer in self.cfg.layers], dtype=torch.float32)
        meta = {"model": self.cfg.model, "layers": json.dumps(self.cfg.layers),
                "percentile": str(self.cfg.cap_percentile),
                "convention": "layer i = output of model.model.layers[i] = hidden_states[i + 1]"}
        save_file({"axis": axis.contiguous(), "axis_unit": unit.contiguous(), "thresholds": thresholds},
                  str(self.out / "capping.safetensors"), metadata=meta)
        info = {"model": self.cfg.model, "layers": self.cfg.layers, "percentile": self.cfg.cap_percentile,
                "thresholds": {str(layer): taus[layer] for layer in self.cfg.layers},
                "n_default_responses": len(default_keys),
                "formula": "h <- h + max(0, tau - <h, a>) * a, a = axis_unit[layer], tau = thresholds[layer]"}
        (self.out / "capping.json").write_text(json.dumps(info, indent=2))
        return info

    def _run_capping_stage(self) -> dict:
        t0 = time.perf_counter()
        info = self.capping_axes()
        self.seconds["capping_axes"] = round(time.perf_counter() - t0, 1)
        return {"layers": info["layers"], "percentile": info["percentile"], "thresholds": info["thresholds"]}

    # -- the whole run -----------------------------------------------------------------------------
    def run(self) -> dict:
        for name, stage in (("generate", self.generate), ("judge", self.judge), ("extract", self.extract)):
            t0 = time.perf_counter()
            stage()
            self.seconds[name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        result = self.vectors_and_axis()
        self.seconds["vectors_axis"] = round(time.perf_counter() - t0, 1)
        if (self.out / "axis.safetensors").exists():
            result["capping"] = self._run_capping_stage()
        items = self.items()
        gen_fail = {it.key: self.responses.records[it.key]["error"] for it in items
                    if it.key in self.responses.records and not self.responses.ok(it.key)}
        judged = [it for it in items if it.persona != DEFAULT and self.responses.ok(it.key)]
        judge_fail = {it.key: self.judgements.records[it.key]["error"] for it in judged
                      if it.key in self.judgements.records and not self.judgements.ok(it.key)}
        summary = {
            "model": self.cfg.model, "layers": self.cfg.layers, "items": len(items),
            "responses": sum(self.responses.ok(it.key) for it in items),
            "generation_failures": len(gen_fail), "judged": sum(self.judgements.ok(it.key) for it in judged),
            "judge_failures": len(judge_fail), "failures": {**gen_fail, **judge_fail},
            "cache": str(self.cache), "out": str(self.out), "seconds": self.seconds, **result,
        }
        missing = [it.key for it in items if it.key not in self.responses.records]
        if missing:  # cannot happen unless a stage was skipped; never silently
            raise RuntimeError(f"{len(missing)} items have no record at all, e.g. {missing[:3]}")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _record(store: JsonlStore, key: str, field: str, call) -> None:
    """Store ``call()``'s result under ``field`` with the attempts it took, or the error it failed with for good."""
    try:
        value, attempts = call_with_retries(call)
        store.put({"key": key, field: value, "attempts": attempts})
    except PermanentFailure as exc:
        store.put({"key": key, "error": str(exc)})


def _run_threads(fn, items, workers: int, desc: str, progress: bool) -> None:
    """:func:`utils.runtime.run_parallel`; ``fn`` records its own failures, so anything it raises is a bug."""
    _, failures = run_parallel(fn, items, max_workers=workers, desc=desc, progress=progress)
    if failures:
        raise RuntimeError(f"{len(failures)} item(s) raised outside their own error handling, e.g. "
                           f"{next(iter(failures.items()))}")


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line: every default is :class:`Config`'s own (written once, there), except the run's size, which
    :class:`Config` requires and the command line defaults to the paper's (240 questions, 5 prompts)."""
    d = SimpleNamespace(**{f.name: f.default for f in fields(Config) if f.default is not MISSING})
    p = argparse.ArgumentParser(description="Resumable Assistant Axis pipeline (generate, judge, extract, vectors, axis).")
    p.add_argument("--model", required=True, help="course model name or hub id (activations are read from it)")
    p.add_argument("--roles", default="all", help="'all', a number N (the first N roles), or a comma list")
    p.add_argument("--questions", type=int, default=240, help="questions per prompt (the paper: all 240)")
    p.add_argument("--prompts", type=int, default=5, help="system prompts per role (and defaults), at most 5 (the paper: 5)")
    p.add_argument("--layers", default=None, help="comma list of block indices (default: the model table's layer)")
    p.add_argument("--backend", choices=["local", "api"], default=d.backend)
    p.add_argument("--judge", choices=["offline", "api"], default=d.judge)
    p.add_argument("--generation-model", default=d.generation_model, help="API model name (default: --model)")
    p.add_argument("--judge-model", default=d.judge_model)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--min-score", type=int, default=d.min_score)
    p.add_argument("--min-count", type=int, default=d.min_count,
                   help="score-3 responses a role needs for a vector (paper: 50)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help="local generation: requests per fixed, seeded chunk (part of the cache key)")
    p.add_argument("--limit", type=int, default=d.limit, help="only the first N items (for small runs)")
    p.add_argument("--cache-dir", type=Path, default=d.cache_dir)
    p.add_argument("--out", type=Path, default=d.out_dir)
    p.add_argument("--stage", choices=["all", "axes"], default=d.stage,
                   help="'axes': only stage 6 (capping axes and thresholds), after stages 1-5 are done")
    p.add_argument("--percentile", type=float, default=d.cap_percentile,
                   help="stage 6: capping threshold = this percentile of default projections (paper: 25)")
    a = p.parse_args(argv)
    if a.chunk_size < 1:
        p.error(f"--chunk-size must be at least 1; got {a.chunk_size}.")
    if not 0.0 < a.percentile < 100.0:
        p.error(f"--percentile must be in (0, 100); got {a.percentile}.")
    all_roles = sorted(load_roles())
    if a.roles == "all":
        roles = all_roles
    elif a.roles.isdigit():
        roles = all_roles[: int(a.roles)]
    else:
        roles = [r.strip() for r in a.roles.split(",") if r.strip()]
    if a.layers:
        layers = [int(x) for x in a.layers.split(",")]
    else:
        layers = [default_layer(a.model, model_n_layers(a.model))]
    return Config(model=a.model, roles=roles, n_questions=a.questions, n_prompts=min(a.prompts, 5), layers=layers,
                  backend=a.backend, judge=a.judge, generation_model=a.generation_model, judge_model=a.judge_model,
                  max_tokens=a.max_tokens, temperature=a.temperature, min_score=a.min_score, min_count=a.min_count,
                  workers=a.workers, limit=a.limit, cache_dir=a.cache_dir, out_dir=a.out,
                  cap_percentile=a.percentile, stage=a.stage, chunk_size=a.chunk_size)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    pipeline = Pipeline(cfg)
    if cfg.stage == "axes":
        print(json.dumps(pipeline.capping_axes(), indent=2))
        return 0
    n = len(pipeline.items())
    print(f"{cfg.model}: {len(cfg.roles)} roles x {cfg.n_prompts} prompts x {cfg.n_questions} questions "
          f"+ defaults = {n} items; layers {cfg.layers}; cache {pipeline.cache}", flush=True)
    summary = pipeline.run()
    printable = {k: v for k, v in summary.items() if k != "failures"}
    print(json.dumps(printable, indent=2))
    for key, error in list(summary["failures"].items())[:20]:
        print(f"FAILED {key}: {error}")
    if summary["failures"]:
        print(f"{len(summary['failures'])} item(s) failed; run the same command again to retry them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
