"""Benchmark mean-activation extraction: two ``output_hidden_states`` baselines against :mod:`utils.activations`.

Run::

    python -m benchmarks.extraction --model smollm2-135m-instruct [--n 64] [--layer 15]

``--layer`` defaults to the layer the course extracts for that model (:func:`utils.models.default_layer`:
the paper's 22 for Gemma 2 27B, half depth otherwise, so 15 of 30 for SmolLM2). The later the layer, the
less there is to skip: the FLOPs limit printed with the results says how much speed-up stopping early
can give at most.

Variants, each timed in a fresh subprocess (so its memory is measured cleanly), on the same
deterministic synthetic conversations (role system prompts from ``data/roles/instructions``,
questions from ``data/extraction_questions.jsonl``, responses of ~100-150 tokens built by repeating
sentences, no generation):

- ``seed_single``: one conversation at a time, ``model(..., output_hidden_states=True)``, mean of
  ``hidden_states[layer + 1]`` over the response span;
- ``seed_batched``: batches of 8 in the given order, right padding, ``output_hidden_states=True``,
  mask from the spans;
- ``fast``: :func:`utils.activations.extract_mean_activations` (hooks, early stop, length-sorted
  batches from a token budget).

In its subprocess each variant is warmed up on one short conversation, run once to measure memory
(peak RSS during extraction minus the RSS after loading and warm-up; the warm-up pages in the
weights a variant touches, so only activations count), then timed ``--repeats`` times with the
best time counting. The machine may be shared: the table shows how many cores *other* processes
kept busy during the timed runs (from ``/proc/stat``); a value well above 0 means contended timings.
The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA = PROJECT_ROOT / "data"
VARIANTS = ("seed_single", "seed_batched", "fast")
LABELS = {"seed_single": "seed single", "seed_batched": "seed batched (8)", "fast": "fast path"}
SEED_BATCH_SIZE = 8
NUM_THREADS = 2

SENTENCES = (
    "That is a good question about {topic}, and it deserves a careful answer.",
    "Speaking as {role}, I would start from what we actually know.",
    "There are a few considerations worth weighing before deciding anything.",
    "First, think about who is affected and what they need from the situation.",
    "Second, look at the evidence rather than the loudest opinion in the room.",
    "Third, be honest about the trade-offs, because every choice has a cost.",
    "In my experience the simplest approach is usually the one that lasts.",
    "If you want, we can go through a concrete example step by step.",
    "People often overlook the small details, yet those details add up quickly.",
    "Whatever you decide, it helps to write down your reasons and revisit them later.",
)


# ----------------------------------------------------------------------------- data


def _system_prompts() -> list[tuple[str, str]]:
    """``(role, system prompt)`` pairs, the first instruction of each role file, sorted by role."""
    out = []
    for path in sorted((DATA / "roles" / "instructions").glob("*.json")):
        instructions = json.loads(path.read_text())["instruction"]
        out.append((path.stem, instructions[0]["pos"]))
    return out


def _questions() -> list[str]:
    lines = (DATA / "extraction_questions.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines if line.strip()]


def synthetic_conversations(tokenizer, n: int, min_response_tokens: int = 100) -> list[list[dict[str, str]]]:
    """``n`` deterministic conversations whose responses have ``min_response_tokens`` to 50 more tokens
    (by this tokenizer)."""
    from utils.conversation import chat_messages

    prompts, questions = _system_prompts(), _questions()
    convs = []
    for i in range(n):
        role, system = prompts[(7 * i) % len(prompts)]
        question = questions[(11 * i) % len(questions)]
        target = min_response_tokens + (37 * i) % 51
        topic = question.rstrip("?.!").split(" ", 3)[-1].lower()
        parts: list[str] = []
        k = i
        while len(tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]) < target:
            parts.append(SENTENCES[k % len(SENTENCES)].format(topic=topic, role=f"a {role}"))
            k += 1
        convs.append(chat_messages(system, question, " ".join(parts)))
    return convs


# ----------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Peak RSS while active: a 2 ms sampling thread, plus the kernel's high-water mark where
    Linux lets us reset it (``/proc/self/clear_refs``), so short spikes are not missed."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._hwm_reset = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    @staticmethod
    def _vm_hwm() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        hwm = self._vm_hwm() if self._hwm_reset else None
        if hwm is not None:
            self.peak = max(self.peak, hwm)


class ForeignLoad:
    """How many CPU cores other processes kept busy while active (Linux ``/proc/stat``; else None)."""

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def __enter__(self) -> ForeignLoad:
        self.cores: float | None = None
        self._busy, self._own, self._wall = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = self._busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            self.cores = max(0.0, (busy - self._busy - (self._own_seconds() - self._own)) / wall)


# ----------------------------------------------------------------------------- variants


def seed_single(model, tokenizer, conversations, layer: int):
    """One conversation per forward pass, all hidden states returned."""
    import torch

    from utils.conversation import response_token_span

    rows = []
    with torch.no_grad():
        for messages in conversations:
            ids, start, end = response_token_span(messages, tokenizer)
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            rows.append(out.hidden_states[layer + 1][0, start:end].float().mean(0))
    return torch.stack(rows)


def seed_batched(model, tokenizer, conversations, layer: int, batch_size: int = SEED_BATCH_SIZE):
    """Batches in the given order, right padding, all hidden states returned, mask from the spans."""
    import torch

    from utils.conversation import response_token_span

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    with torch.no_grad():
        for b in range(0, len(conversations), batch_size):
            spans = [response_token_span(m, tokenizer) for m in conversations[b:b + batch_size]]
            width = max(len(ids) for ids, _, _ in spans)
            input_ids = torch.full((len(spans), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(spans), width), dtype=torch.long)
            mask = torch.zeros((len(spans), width, 1))
            for r, (ids, start, end) in enumerate(spans):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                attention_mask[r, :len(ids)] = 1
                mask[r, start:end] = 1.0
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            h = out.hidden_states[layer + 1].float()
            rows.append((h * mask).sum(1) / mask.sum(1))
    return torch.cat(rows)


def fast(model, tokenizer, conversations, layer: int):
    from utils.activations import extract_mean_activations

    return extract_mean_activations(model, tokenizer, conversations, layer, progress=False)


def run_worker(variant: str, model_name: str, n: int, layer: int, repeats: int, out_path: str) -> None:
    """Load the model, warm up, measure one variant's peak memory in one run, then time it
    ``repeats`` times; write JSON + the result tensor."""
    import torch

    from utils.models import load_model

    torch.set_num_threads(NUM_THREADS)
    fn = {"seed_single": seed_single, "seed_batched": seed_batched, "fast": fast}[variant]
    model, tokenizer = load_model(model_name)
    conversations = synthetic_conversations(tokenizer, n)
    n_tokens = 0
    from utils.conversation import response_token_span

    for messages in conversations:
        n_tokens += len(response_token_span(messages, tokenizer)[0])
    shortest = min(conversations, key=lambda m: len(m[-1]["content"]))
    fn(model, tokenizer, [shortest], layer)  # warm-up: one short conversation
    rss_loaded = rss_bytes()
    # Memory in a pass of its own: the sampling thread would otherwise steal CPU from the timed runs.
    with PeakRSS() as mem:
        fn(model, tokenizer, conversations, layer)
    times = []
    with ForeignLoad() as load:
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn(model, tokenizer, conversations, layer)
            times.append(time.perf_counter() - t0)
    torch.save(result.float().cpu(), out_path + ".pt")
    Path(out_path).write_text(json.dumps({
        "variant": variant, "seconds": min(times), "times": times, "foreign_cores": load.cores,
        "tokens": n_tokens, "rss_loaded": rss_loaded,
        "rss_peak": mem.peak, "rss_added": max(0, mem.peak - rss_loaded),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }))


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(model, layer: int, mean_len: float) -> tuple[float, float]:
    """Approximate forward FLOPs per token: (full model incl. LM head, blocks 0..layer only).

    Matmuls cost 2 x parameters; attention adds ``4 * n_heads * head_dim * context`` per layer with
    an average causal context of ``mean_len / 2``. Embedding lookups and norms are ignored.
    """
    cfg = model.config
    blocks = model.model.layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4 * cfg.num_attention_heads * head_dim * (mean_len / 2)
    per_block = [2 * sum(p.numel() for p in b.parameters()) + attn for b in blocks]
    lm_head = 2 * cfg.vocab_size * cfg.hidden_size
    return sum(per_block) + lm_head, sum(per_block[:layer + 1])


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64, help="number of conversations")
    parser.add_argument("--layer", type=int, default=None,
                        help="block output to average (0-indexed; default: the course's layer for the model)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best counts")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args.worker, args.model, args.n, args.layer, args.repeats, args.out)
        return 0

    import torch

    from utils.models import default_layer, load_model

    torch.set_num_threads(NUM_THREADS)
    model, tokenizer = load_model(args.model)
    n_layers = model.config.num_hidden_layers
    if args.layer is None:
        args.layer = default_layer(args.model, n_layers)
    if not 0 <= args.layer < n_layers:
        parser.error(f"--layer must be in 0..{n_layers - 1} for {args.model}")
    conversations = synthetic_conversations(tokenizer, args.n)
    from utils.conversation import response_token_span

    spans = [response_token_span(m, tokenizer) for m in conversations]
    lengths = [len(ids) for ids, _, _ in spans]
    resp = [e - s for _, s, e in spans]
    full_flops, part_flops = flops_per_token(model, args.layer, sum(lengths) / len(lengths))
    del model

    print(f"model {args.model}: {n_layers} layers, layer {args.layer}, {args.n} conversations, "
          f"{sum(lengths)} tokens (conversation {min(lengths)}-{max(lengths)}, response {min(resp)}-{max(resp)}), "
          f"torch {torch.__version__}, {NUM_THREADS} threads", flush=True)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = str(Path(tmp) / variant)
            cmd = [sys.executable, "-m", "benchmarks.extraction", "--worker", variant, "--model", args.model,
                   "--n", str(args.n), "--layer", str(args.layer), "--repeats", str(args.repeats), "--out", out]
            env = dict(os.environ, TQDM_DISABLE="1")
            proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
            results[variant] = json.loads(Path(out).read_text())
            results[variant]["tensor"] = torch.load(out + ".pt", weights_only=True)

    mib = 2 ** 20
    print(f"{'variant':<18}{'best s':>8}{'tokens/s':>10}{'RSS loaded':>12}{'peak':>10}{'added':>10}"
          f"{'other load':>12}  all runs (s)")
    for v in VARIANTS:
        r = results[v]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        other = "n/a" if r["foreign_cores"] is None else f"{r['foreign_cores']:.2f} cores"
        print(f"{LABELS[v]:<18}{r['seconds']:>8.2f}{r['tokens_per_s']:>10.0f}{r['rss_loaded'] / mib:>9.0f}MiB"
              f"{r['rss_peak'] / mib:>7.0f}MiB{r['rss_added'] / mib:>7.0f}MiB{other:>12}  "
              + " ".join(f"{t:.2f}" for t in r["times"]))

    fast_r, single_r, batched_r = results["fast"], results["seed_single"], results["seed_batched"]
    max_abs_diff = (fast_r["tensor"] - single_r["tensor"]).abs().max().item()
    max_abs_diff_batched = (fast_r["tensor"] - batched_r["tensor"]).abs().max().item()
    scale = single_r["tensor"].abs().max().item()
    summary = {
        "model": args.model,
        "layer": args.layer,
        "n": args.n,
        "tokens": fast_r["tokens"],
        "attn_implementation": fast_r["attn_implementation"],
        "tokens_per_s_seed_single": round(single_r["tokens_per_s"], 1),
        "tokens_per_s_seed_batched": round(batched_r["tokens_per_s"], 1),
        "tokens_per_s_fast": round(fast_r["tokens_per_s"], 1),
        "speedup_vs_seed_single": round(fast_r["tokens_per_s"] / single_r["tokens_per_s"], 3),
        "speedup_vs_seed_batched": round(fast_r["tokens_per_s"] / batched_r["tokens_per_s"], 3),
        "memory_added_mib_seed_single": round(single_r["rss_added"] / mib, 1),
        "memory_added_mib_seed_batched": round(batched_r["rss_added"] / mib, 1),
        "memory_added_mib_fast": round(fast_r["rss_added"] / mib, 1),
        "memory_added_ratio_vs_seed_batched": round(fast_r["rss_added"] / max(1, batched_r["rss_added"]), 3),
        "max_abs_diff": max_abs_diff,
        "max_abs_diff_vs_seed_batched": max_abs_diff_batched,
        "max_abs_value": scale,
        "repeats": args.repeats,
        "other_load_cores": {v: results[v]["foreign_cores"] for v in VARIANTS},
        "flops_limit_ratio": round(full_flops / part_flops, 3),
    }
    print(f"speed-up: {summary['speedup_vs_seed_batched']:.2f}x vs seed batched, "
          f"{summary['speedup_vs_seed_single']:.2f}x vs seed single "
          f"(FLOPs limit from stopping at layer {args.layer}: {summary['flops_limit_ratio']:.2f}x)")
    print(f"memory added: fast {summary['memory_added_mib_fast']:.0f} MiB = "
          f"{100 * summary['memory_added_ratio_vs_seed_batched']:.0f}% of seed batched "
          f"({summary['memory_added_mib_seed_batched']:.0f} MiB)")
    print(f"max |fast - seed single| = {max_abs_diff:.2e} (values up to {scale:.1f}); "
          f"max |fast - seed batched| = {max_abs_diff_batched:.2e}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
