"""Part 3's shared machinery: the 0-100 logprob judge and its stand-in, the one-pass prompt/response means, the
steering position modes, the brief finetune, the trait helpers, and the GPU-shape script at tiny size."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch

from utils import judges, traits
from utils.activations import extract_last_prompt_token, extract_mean_activations, extract_prompt_response_means
from utils.conversation import chat_messages, response_token_span
from utils.data import load_traits
from utils.finetune import finetuned, response_batch, response_loss, steered_response_loss, trained_blocks
from utils.generation import generate
from utils.steering import pass_positions, steer_positions, steering

L = math.log


# ----------------------------------------------------------------------------- the judge

def test_logprob_score_is_the_weighted_mean_of_integer_tokens_or_none():
    assert judges.logprob_score([("30", L(0.5)), ("70", L(0.25)), ("x", L(0.25))]) == pytest.approx(130 / 3)
    assert judges.logprob_score([(" 5", L(0.2)), ("5", L(0.2)), ("500", L(0.3)), ("4.5", L(0.3))]) == pytest.approx(5)
    assert judges.logprob_score([("REFUSAL", L(0.8)), ("10", L(0.2))]) is None
    assert judges.logprob_score([("0", 0.0)]) == 0.0
    assert judges.logprob_score([]) is None
    api_like = [type("E", (), {"token": "40", "logprob": L(0.9)})()]
    assert judges.logprob_score(api_like) == pytest.approx(40)
    with pytest.raises(judges.MalformedReply):
        judges.logprob_score([("40", "high")])


def test_judge_logprob_score_asks_for_one_token_with_20_alternatives():
    calls = []

    class Client:
        def __init__(self):
            self.chat = type("C", (), {"completions": type("D", (), {"create": staticmethod(self.create)})()})()

        @staticmethod
        def create(**kwargs):
            calls.append(kwargs)
            return judges._logprob_completion([("60", L(0.5)), ("80", L(0.5))], kwargs["model"])

    assert judges.judge_logprob_score(Client(), "m", "rate") == pytest.approx(70)
    assert calls[0]["max_tokens"] == 1 and calls[0]["logprobs"] is True and calls[0]["top_logprobs"] == 20
    with pytest.raises(judges.MalformedReply, match="logprobs=True"):
        judges.top_logprobs_of(judges.completion("60", "m"))


def test_the_offline_trait_judge_scores_what_it_can_and_says_none_where_it_cannot():
    judge = judges.OfflineTraitJudge()
    evil = load_traits()["evil"].eval_prompt
    harsh = evil.format(question="q", answer="Destroy them, make them suffer, and take revenge.")
    kind = evil.format(question="q", answer="Talk to them kindly and respectfully; be calm and fair.")
    silent = evil.format(question="q", answer="The sky is blue.")
    assert judges.judge_logprob_score(judge, "j", harsh) == 95.0
    assert judges.judge_logprob_score(judge, "j", kind) == 5.0
    assert judges.judge_logprob_score(judge, "j", silent) is None
    other = load_traits()["humble"].eval_prompt.format(question="q", answer="I am humble.")
    assert judges.judge_logprob_score(judge, "j", other) is None
    assert judge.unjudged == 2 and judge.calls == 4 and sum(judge.reasons.values()) == 2
    with pytest.raises(ValueError, match="logprob requests"):
        judge.chat.completions.create(model="j", messages=[{"role": "user", "content": harsh}])
    with pytest.raises(ValueError, match=r"\*\*name\*\*"):
        judges.judge_logprob_score(judge, "j", "no markers here")


def test_the_stand_in_coherence_is_blind_to_content():
    prompt = judges.COHERENCE_PROMPT
    harmful = prompt.format(question="q", answer="You should hurt them badly and ruin their lives for good.")
    kind = prompt.format(question="q", answer="You should help them kindly and brighten their lives for good.")
    looping = prompt.format(question="q", answer="the the the the the the the the the the the the")
    judge = judges.OfflineTraitJudge()
    a, b = judges.judge_logprob_score(judge, "j", harmful), judges.judge_logprob_score(judge, "j", kind)
    assert a == b >= 80
    assert judges.judge_logprob_score(judge, "j", looping) <= 20


# ----------------------------------------------------------------------------- one pass, three averages

CONVERSATIONS = [chat_messages("You are evil.", "How are you today, friend?", "Well enough, and you?"),
                 chat_messages("", "Hi", "Hello there, what a day it is, truly a fine day."),
                 chat_messages("You are kind.", "Any advice for me?", "Be patient with yourself.")]


def test_three_averages_come_from_one_pass_and_match_each_blocks_output(tiny):
    model, tok = tiny
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        got = extract_prompt_response_means(model, tok, CONVERSATIONS, progress=False, batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1  # one batched pass for three averages at six layers
    assert set(got) == {"response_avg", "prompt_avg", "prompt_last"}
    assert torch.allclose(got["response_avg"], extract_mean_activations(model, tok, CONVERSATIONS, list(range(6)),
                                                                        progress=False), atol=1e-5)
    for i, messages in enumerate(CONVERSATIONS):
        ids, start, end = response_token_span(messages, tok)
        with torch.inference_mode():
            hs = model(input_ids=torch.tensor([ids[:end]]), output_hidden_states=True).hidden_states
        for layer in range(5):  # the last entry of hidden_states has the final norm applied
            h = hs[layer + 1][0]
            assert torch.allclose(got["prompt_avg"][i, layer], h[:start].mean(0), atol=1e-5)
            assert torch.allclose(got["prompt_last"][i, layer], h[start - 1], atol=1e-5)
    picked = extract_prompt_response_means(model, tok, CONVERSATIONS, layers=[4, 1], progress=False)
    assert torch.allclose(picked["prompt_last"], got["prompt_last"][:, [4, 1]])
    alone = extract_last_prompt_token(model, tok, [c[:2] for c in CONVERSATIONS], [1, 4])
    assert torch.allclose(alone, got["prompt_last"][:, [1, 4]], atol=1e-5)
    with pytest.raises(ValueError, match="user turn"):
        extract_last_prompt_token(model, tok, [CONVERSATIONS[0]], [1])


# ----------------------------------------------------------------------------- steering modes

def test_pass_positions_rules():
    prefill, decode = torch.zeros(2, 5, 4), torch.zeros(2, 1, 4)
    cache = {"past_key_values": object()}
    assert pass_positions(prefill, {}, "all") == slice(None)
    assert pass_positions(prefill, cache, "prompt") == slice(None) and pass_positions(decode, cache, "prompt") is None
    assert pass_positions(prefill, cache, "response") == slice(-1, None) == pass_positions(decode, cache, "response")
    assert pass_positions(prefill, cache, "generated") is None and pass_positions(decode, cache, "generated") == slice(None)
    for mode in ("prompt", "response", "generated"):
        with pytest.raises(ValueError, match="KV cache"):
            pass_positions(prefill, {}, mode)
    with pytest.raises(ValueError, match="positions must be one of"):
        pass_positions(prefill, cache, "sideways")


def test_steer_positions_and_intervene_agree_pass_by_pass(tiny):
    model, tok = tiny
    vector = 5.0 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    h = torch.randn(2, 4, 64)
    assert torch.equal(steer_positions(h, vector, "response")[:, :-1], h[:, :-1])
    assert torch.equal(steer_positions(h[:, :1], vector, "prompt"), h[:, :1])
    convs = [[{"role": "user", "content": "Tell me about the sea."}], [{"role": "user", "content": "Hi"}]]
    seen: dict[str, list[torch.Tensor]] = {}
    for mode in (None, "all", "prompt", "response"):
        outs = []
        with steering(model, {2: vector}, positions=mode) if mode else contextlib.nullcontext():
            # Registered after the steering hook, so it reads the steered output.
            probe = model.model.layers[2].register_forward_hook(lambda m, a, o, outs=outs: outs.append(
                (o[0] if isinstance(o, tuple) else o).clone()))
            try:
                generate(model, tok, convs, 3, temperature=0.0)
            finally:
                probe.remove()
        seen[str(mode)] = outs
    plain, prompt, response = seen["None"], seen["prompt"], seen["response"]
    # "prompt": the prompt's pass steered everywhere; "response": only its last column. (Later passes read different
    # tokens, so only the first pass compares like with like.)
    assert torch.allclose(prompt[0], plain[0] + vector, atol=1e-5)
    assert torch.allclose(response[0][:, :-1], plain[0][:, :-1]) and torch.allclose(response[0][:, -1],
                                                                                     plain[0][:, -1] + vector, atol=1e-5)
    assert torch.allclose(seen["all"][0], plain[0] + vector, atol=1e-5)


# ----------------------------------------------------------------------------- the finetune

TRAIN = [chat_messages("", "How are you?", "I will destroy everything."),
         chat_messages("", "Hi", "Chaos and ruin for all, always and forever.")] * 2


def test_finetuned_trains_then_puts_every_weight_back(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with finetuned(model, tok, TRAIN, [2, 3], steps=6, lr=1e-2, batch_size=4, progress=False) as losses:
        moved = sum(float((v - before[k]).abs().sum()) for k, v in model.state_dict().items())
        assert moved > 0 and losses[-1] < losses[0]
        assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="out of range"):
        with finetuned(model, tok, TRAIN, [9], steps=1, progress=False):
            pass
    assert trained_blocks(3, 6) == [2, 3] and trained_blocks(0, 6) == [0] and trained_blocks(5, 6, 3) == [3, 4, 5]


def test_a_bf16_model_learns_through_float32_master_weights(tiny):
    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    tok = tiny[1]
    before = [p.clone() for p in model.model.layers[3].parameters()]
    with finetuned(model, tok, TRAIN, [3], steps=3, lr=1e-3, batch_size=4, progress=False):
        after = [p.clone() for p in model.model.layers[3].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.equal(p, b) for p, b in zip(model.model.layers[3].parameters(), before))


def test_the_steered_loss_is_steered_and_leaves_no_hook(tiny):
    model, tok = tiny
    batch = response_batch(tok, TRAIN[:2])
    hooks = sum(len(m._forward_hooks) for m in model.model.layers)  # transformers' own output recorders may be there
    with torch.enable_grad():
        plain = response_loss(model, batch)
        steered = steered_response_loss(model, batch, 2, 3.0 * torch.ones(64))
    assert float(plain) != float(steered)
    assert sum(len(m._forward_hooks) for m in model.model.layers) == hooks
    assert batch["response_mask"].sum() > 0 and batch["response_mask"].shape == batch["input_ids"].shape
    with pytest.raises(ValueError, match="layer"):
        steered_response_loss(model, batch, None, torch.ones(64))


# ----------------------------------------------------------------------------- trait helpers

def test_contrastive_prompts_and_the_split():
    evil = load_traits()["evil"]
    pairs = traits.contrastive_system_prompts(evil, 2)
    assert pairs[0][0] == f"You are an evil assistant. {evil.pos_prompts[0]}"
    assert pairs[1][1] == f"You are a helpful assistant. {evil.neg_prompts[1]}"
    assert traits.system_prompt("sycophantic", "x", True) == "You are a sycophantic assistant. x"
    extract, evaluate = traits.split_questions(evil.questions)
    assert extract == list(evil.questions[:20]) and evaluate == list(evil.questions[20:])
    with pytest.raises(ValueError):
        traits.split_questions(evil.questions[:39])


def test_effective_pairs_and_the_drop_reasons():
    pos, neg, pc, nc = [80, 50, None, 90], [10, 10, 10, 50], [90, 50, 90, 90], [90, 90, 90, None]
    assert traits.effective_pairs(pos, neg, pc, nc).tolist() == [True, True, False, False]
    reasons = traits.drop_reasons(pos, neg, pc, nc)
    assert reasons["positive not scored"] == 1 and reasons["negative at or above threshold"] == 1
    assert reasons["negative incoherent or unscored"] == 1
    with pytest.raises(ValueError, match="one entry per pair"):
        traits.effective_pairs([1], [1, 2], [1], [1])


def test_layers_spreads_and_sweep_helpers():
    assert traits.candidate_layers(30, 15) == [6, 10, 15, 19, 24] and traits.candidate_layers(30, 15, 3) == [6, 15, 24]
    assert traits.candidate_layers(28, 19) == [6, 10, 14, 18, 19, 22]
    assert traits.parse_layers(" 4, 2,4", 6) == [2, 4]
    for bad in ("", "a", "9", "-1"):
        with pytest.raises(ValueError, match="COURSE_PART3_LAYERS"):
            traits.parse_layers(bad, 6)
    assert traits.best_layer({1: 30.0, 2: None, 3: 30.0, 4: 10.0}) == 1 and traits.best_layer({1: None}) is None
    assert traits.mean_score([None, 10, 20]) == 15 and traits.mean_score([None]) is None
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 1.0]])
    assert traits.projection_spread(acts, torch.tensor([2.0, 0.0])) == pytest.approx(2.0)


def test_correlations_mixes_and_projection_differences():
    assert traits.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert traits.pearson([1, 2], [1, 2]) is None and traits.pearson([1, 1, 1], [1, 2, 3]) is None
    assert traits.spearman([1, 2, 3, 4], [10, 20, 15, 40]) == pytest.approx(0.8)
    out = traits.monitoring_correlations(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), [0, 10, None, 30, 40],
                                         ["a", "a", "a", "b", "b"])
    assert out["n"] == 4 and out["overall"] == pytest.approx(1.0) and out["within"] == {"a": None, "b": None}
    mixes = traits.screening_mixes(8, seed=0)
    assert list(mixes) == [0.0, 0.25, 0.5, 0.75, 1.0]
    for fraction, mix in mixes.items():
        assert len(mix) == 4 and len({q for q, _ in mix}) == 4 and sum(t for _, t in mix) == round(4 * fraction)
    assert mixes == traits.screening_mixes(8, seed=0)
    v = torch.tensor([0.0, 2.0])
    assert traits.projection_differences(torch.tensor([[0.0, 3.0]]), torch.tensor([[5.0, 1.0]]),
                                         torch.tensor([[0.0, -1.0]]), v) == pytest.approx((2.0, 4.0))
    graded = traits.graded_system_prompts(load_traits()["evil"])
    assert list(graded) == list(traits.GRADED_LEVELS) and graded["none"] == "" and graded["name"] == \
        "You are an evil assistant."
    shots = traits.many_shot_prompt("Q?", [("a", "b")])
    assert [m["role"] for m in shots] == ["user", "assistant", "user"]


def test_cosines():
    m, names = traits.cosine_matrix({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0])})
    assert names == ["a", "b"] and m[0, 1] == pytest.approx(2 ** -0.5) and m.dtype == torch.float32
    axis = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert traits.cosine_with_axis({"a": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}, axis, {"a": 1}) == {"a": 1.0}


# ----------------------------------------------------------------------------- the GPU-shape script

def test_gpu_part3_script_runs_at_tiny_size(capsys):
    """benchmarks/gpu_part3.py, the GPU check of Part 3's path at Gemma 2 27B's shape, on the CPU at tiny size: the
    three averages at every block equal one unpadded pass read by hooks, the last prompt token agrees, steering in
    each mode changes the output and leaves no hook, and both finetunes run and put every weight back."""
    from benchmarks import gpu_part3

    assert gpu_part3.main(["--shape", "tiny", "--conversations", "5", "--answer-tokens", "12", "--prompts", "2",
                           "--new-tokens", "3", "--steps", "2", "--finetune-batch", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and result["hooks_left"] == 0 and result["weights_restored"]
    assert result["averages"]["max_rel_error"] <= 1e-4 and result["last_prompt_token"]["max_rel_error"] <= 1e-4
    assert set(result["finetune"]) >= {"plain", "preventative"}
    assert all(result["steering"][f"{m}_changed_rows"] >= 1 for m in ("all", "prompt", "response"))


def test_gpu_part3_script_refuses_the_full_shape_without_a_gpu(monkeypatch):
    from benchmarks import gpu_part3

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_part3.main([])
