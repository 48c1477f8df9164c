"""Model loading: tiny-gemma2 is Gemma-faithful and deterministic; errors say what to do instead."""

import json

import pytest
import torch

from utils import models
from utils.models import ModelLoadError, load_model


def test_tiny_gemma2_tokenizer_is_gemma_faithful(tiny):
    _, tok = tiny
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
                                                        "<start_of_turn>", "<end_of_turn>", "\n")}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<start_of_turn>": 106,
                   "<end_of_turn>": 107, "\n": 108}
    assert tok("hello").input_ids[0] == tok.bos_token_id  # BOS added by default, like Gemma
    assert tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"}],
                                   tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    # Tokenising templated text with special tokens doubles the BOS, exactly as with real Gemma.
    assert tok(text).input_ids[:2] == [2, 2]
    assert tok(text, add_special_tokens=False).input_ids[:2] == [2, 106]
    assert tok.decode(tok("a ü é 字", add_special_tokens=False).input_ids) == "a ü é 字"  # byte fallback


def test_tiny_gemma2_template_rejects_system_role_and_non_alternating_turns(tiny):
    _, tok = tiny
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenize=False)
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "U"}, {"role": "user", "content": "U"}], tokenize=False)
    enc = tok.apply_chat_template([{"role": "user", "content": "U"}], tokenize=True, return_dict=True,
                                  add_generation_prompt=True)
    assert enc["input_ids"][:2] == [2, 106]


def test_tiny_gemma2_model_config(tiny):
    model, _ = tiny
    cfg = model.config
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (6, 64)
    assert cfg.attn_logit_softcapping == 50.0 and cfg.final_logit_softcapping == 30.0
    assert cfg._attn_implementation == "eager"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    out = model(torch.tensor([[2, 106, 500, 108]]), output_hidden_states=True)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1


def test_tiny_gemma2_build_is_deterministic(tmp_path):
    from utils.models import build_tiny_gemma2

    a, b = build_tiny_gemma2(tmp_path / "a"), build_tiny_gemma2(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert 1_500_000 < (a / "model.safetensors").stat().st_size < 3_000_000
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0  # top level, so transformers 4.57 reads it too


def test_two_processes_building_the_tiny_cache_at_once_both_get_the_whole_model(tmp_path):
    """The suite's workers (and two notebooks) may both find the cache empty: one builds, the other waits for it."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PERSONA_COURSE_CACHE=str(tmp_path))
    code = ("from utils.models import tiny_gemma2_path; p = tiny_gemma2_path(); "
            "print(len((p / 'model.safetensors').read_bytes()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=models.PROJECT_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    sizes = {int(out) for out, _ in results}
    assert len(sizes) == 1 and sizes.pop() > 1_500_000
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-gemma2", "tiny-gemma2.lock"]


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ModelLoadError, match="tiny-gemma2.*smollm2-135m-instruct"):
        load_model("gemma-27b")


def test_hub_model_offline_says_which_offline_model_to_use(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("google/gemma-2-27b-it")
    assert "smollm2-135m-instruct" in str(info.value) and "COURSE_MODEL" in str(info.value)


def test_choose_model(monkeypatch):
    monkeypatch.setenv("COURSE_MODEL", "tiny-gemma2")
    assert models.choose_model().name == "tiny-gemma2"
    monkeypatch.delenv("COURSE_MODEL")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = models.choose_model()
    assert choice.name == models.SMOLLM2 and "No CUDA GPU" in choice.reason


def test_default_layer_follows_the_paper():
    assert models.default_layer("google/gemma-2-27b-it", 46) == 22
    assert models.default_layer("smollm2-135m-instruct", 30) == 15


def test_smollm2_cache_is_float32_safetensors_with_top_level_rope_theta():
    path = models.smollm2_path(progress=False)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert not isinstance(tok_cfg.get("extra_special_tokens"), list)  # would crash transformers 4.57
    assert tok_cfg.get("tokenizer_class") != "TokenizersBackend"  # 5.x only: 4.57 cannot load it
    assert "quantization_config" not in cfg  # the folder is float32, not GGUF-quantised
    model, tok = load_model(models.SMOLLM2, torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_smollm2_tokenizer_is_the_same_whatever_transformers_read_the_gguf():
    """4.57 reads the GGUF's vocabulary into a Llama-style tokenizer (a BOS on every text, byte fallback, no
    padding token, EOS <|im_start|>); 5.x into SmolLM2's own. ``_smollm2_tokenizer`` must turn both into
    the same tokenizer. Simulate 4.57's version by perturbing the cached one."""
    from tokenizers import Tokenizer, processors

    from transformers import PreTrainedTokenizerFast

    cached = load_model(models.SMOLLM2)[1]
    data = json.loads(cached.backend_tokenizer.to_str())
    data["model"].update(unk_token="<|endoftext|>", fuse_unk=True, byte_fallback=True)
    llama_style_backend = Tokenizer.from_str(json.dumps(data))
    llama_style_backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)])
    llama_style = PreTrainedTokenizerFast(tokenizer_object=llama_style_backend, bos_token="<|im_start|>",
                                          eos_token="<|im_start|>", unk_token="<|endoftext|>")
    llama_style.chat_template = cached.chat_template
    assert llama_style("Hi").input_ids[0] == 1  # the perturbation took

    texts = ["Hello world!", "  spaces\nand newlines\n\n", "Ünïcödé, emoji 🎭, 中文", "<|im_start|>user\nHi<|im_end|>"]
    messages = [{"role": "system", "content": "You are a bard."}, {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "A humble singer of tales."}]
    for source in (cached, llama_style):
        tok = models._smollm2_tokenizer(source)
        assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.padding_side) == \
            ("<|im_start|>", "<|im_end|>", "<|im_end|>", "right")
        for text in texts:
            assert tok(text).input_ids == cached(text, add_special_tokens=False).input_ids  # nothing added
            assert tok.decode(tok(text).input_ids) == text
        assert "token_type_ids" not in tok(texts[0])
        assert tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == \
            cached.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_an_older_smollm2_cache_is_rebuilt_not_reused(tmp_path, monkeypatch):
    """A cache without this version's stamp (e.g. one with 5.x's TokenizersBackend class, which 4.57 cannot
    load) is rebuilt from the GGUF; a current one is reused."""
    import shutil

    class Rebuilding(Exception):
        pass

    def gguf_path():
        raise Rebuilding

    src = models.smollm2_path(progress=False)
    monkeypatch.setenv("PERSONA_COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf_path", gguf_path)
    cached = tmp_path / "models" / models.SMOLLM2
    shutil.copytree(src, cached)
    assert models.smollm2_path(progress=False) == cached  # current stamp: reused
    (cached / "COURSE_CACHE_VERSION").write_text("1\n")
    with pytest.raises(Rebuilding):
        models.smollm2_path(progress=False)


def test_one_model_benchmark_runs_at_tiny_size(capsys):
    from benchmarks import one_model

    assert one_model.main(["--model", "tiny-gemma2", "--n", "4", "--new-tokens", "2", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["chosen_dtype"] == "float32"  # the table's dtype for the test model
    assert result["max_abs_diff"] == 0.0 and result["min_cosine"] > 0.99999
    assert result["extract_ratio_chosen_vs_float32"] > 0 and result["generate_ratio_chosen_vs_float32"] > 0
