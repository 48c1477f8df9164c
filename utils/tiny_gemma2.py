"""Build ``tiny-gemma2``: a 2 MB random Gemma 2 model with a Gemma-faithful tokenizer.

It exists so that tests and checks exercise exactly the code paths Gemma 2 27B takes
(left padding, BOS handling, no system role, ``<start_of_turn>`` markers, softcapping)
in a fraction of a second, offline.

Everything here is deterministic: the BPE merges are trained on ``pydoc_data.topics``
(text that ships with CPython), and the weights are drawn from a seeded torch
generator rather than transformers' initialisers, which change between versions.

``load_model("tiny-gemma2")`` (:mod:`utils.models`) builds it on first use, with the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import Gemma2Config, Gemma2ForCausalLM

# Gemma 2's chat template, behaviour for behaviour: BOS first, no system role,
# strictly alternating user/model turns, ``assistant`` rendered as ``model``, contents trimmed.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Ids fixed to match the real Gemma 2 vocabulary.
FIXED_TOKENS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
                "<start_of_turn>": 106, "<end_of_turn>": 107, "\n": 108}
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BPE_VOCAB_SIZE = 2048

CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=256,
    sliding_window=32,
    query_pre_attn_scalar=16,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)
SEED = 0


def _training_text() -> list[str]:
    return [topics[k] for k in sorted(topics)]


def build_tokenizer_json(out_dir: Path) -> int:
    """Train BPE merges offline and write a Gemma-shaped ``tokenizer.json``. Returns the vocab size."""
    # 1. Learn merges with Gemma's normaliser (spaces become "▁", no dummy prefix).
    trainer_tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(_training_text(), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    # 2. Lay out ids as Gemma does: specials, unused slots, turn markers, "\n", byte fallback, BPE pieces.
    vocab: dict[str, int] = {}
    next_unused = 0
    for i in range(109):
        token = next((t for t, j in FIXED_TOKENS.items() if j == i), None)
        if token is None:
            token = f"<unused{next_unused}>"
            next_unused += 1
        vocab[token] = i
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    return len(vocab)


def write_tokenizer_config(out_dir: Path) -> None:
    """A config that transformers 4.57 and 5.x both read the same way."""
    added = {
        str(FIXED_TOKENS[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "added_tokens_decoder": added,
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "chat_template": GEMMA2_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    }, indent=2, sort_keys=True))


def build_random_model(vocab_size: int) -> Gemma2ForCausalLM:
    """Seeded random float32 Gemma2ForCausalLM (the caller saves it)."""
    config = Gemma2Config(
        vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        attn_implementation="eager", **CONFIG,
    )
    model = Gemma2ForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                # Gemma's RMSNorm scales by (1 + weight); small noise keeps it near identity.
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=gen))
    return model
