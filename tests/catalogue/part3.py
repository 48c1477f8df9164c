"""Part 3's catalogue: realistic mistakes and alternative correct answers for every check.

Mistakes are small wrong implementations; variants are independent correct implementations that never call the
reference solution (nor the course's own implementation of the same exercise).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import statistics

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from tests.catalogue import Entry, Mistake, Variant


# ==================================================================================================
# Exercise 1: contrastive_prompts and split_questions
# ==================================================================================================

def _prompts_with(*, swap=False, neg_name=False, article="right", underscores=False, ignore_n=False, shift=0,
                  check=True, period=True):
    def contrastive_prompts(trait, n_pairs):
        if check and not 1 <= n_pairs <= 5:
            raise ValueError("n_pairs must be in 1..5")
        name = trait.name if underscores else trait.name.replace("_", " ")

        def art(word):
            if article == "a":
                return "a"
            if article == "an":
                return "an"
            return "an" if word[0] in "aeiou" else "a"

        def prompt(who, instruction):
            return f"You are {art(who)} {who} assistant{'.' if period else ''} {instruction}"

        n = 5 if ignore_n else n_pairs
        out = []
        for i in range(n):
            j = (i + shift) % 5
            pos = prompt(name, trait.pos_prompts[j])
            neg = prompt(name if neg_name else "helpful", trait.neg_prompts[j])
            out.append((neg, pos) if swap else (pos, neg))
        return out
    return contrastive_prompts


def prompts_regex(trait, n_pairs):
    """Chooses the article with a regular expression."""
    if n_pairs not in range(1, len(trait.pos_prompts) + 1):
        raise ValueError(f"bad n_pairs {n_pairs}")
    def sentence(noun, text):
        return "You are {} {} assistant. {}".format("an" if re.match(r"[aeiouAEIOU]", noun) else "a", noun, text)
    noun = " ".join(trait.name.split("_"))
    return [(sentence(noun, p), sentence("helpful", n)) for p, n in list(zip(trait.pos_prompts, trait.neg_prompts))[:n_pairs]]


def prompts_loop(trait, n_pairs):
    """An explicit loop over indices, string concatenation."""
    if n_pairs < 1 or n_pairs > 5:
        raise ValueError("a trait has 5 pairs")
    name = trait.name.replace("_", " ")
    article = "an" if name[:1] in ("a", "e", "i", "o", "u") else "a"
    pairs = []
    for i in range(n_pairs):
        positive = "You are " + article + " " + name + " assistant. " + trait.pos_prompts[i]
        negative = "You are a helpful assistant. " + trait.neg_prompts[i]
        pairs.append((positive, negative))
    return pairs


def prompts_template(trait, n_pairs):
    """A string.Template."""
    from string import Template

    if not (0 < n_pairs <= 5):
        raise ValueError(n_pairs)
    t = Template("You are $article $name assistant. $instruction")
    name = trait.name.replace("_", " ")
    return [(t.substitute(article="an" if name[0].lower() in "aeiou" else "a", name=name, instruction=p),
             t.substitute(article="a", name="helpful", instruction=n))
            for p, n in zip(trait.pos_prompts[:n_pairs], trait.neg_prompts[:n_pairs])]


def _prompt_mistakes():
    return (
        Mistake("positive and negative swapped", _prompts_with(swap=True), "swapped"),
        Mistake("the negative prompt names the trait", _prompts_with(neg_name=True), "names the negative assistant 'helpful'"),
        Mistake("always 'a'", _prompts_with(article="a"), "use 'an' before a vowel"),
        Mistake("always 'an'", _prompts_with(article="an"), "use 'a' before a consonant"),
        Mistake("underscores kept", _prompts_with(underscores=True), "underscores as spaces"),
        Mistake("n_pairs ignored", _prompts_with(ignore_n=True), "return the first n_pairs"),
        Mistake("pair i uses instruction i + 1", _prompts_with(shift=1), "must use instruction"),
        Mistake("no error for n_pairs outside 1..5", _prompts_with(check=False), "raise a ValueError for n_pairs"),
        Mistake("no period after 'assistant'", _prompts_with(period=False), "wording differs"),
    )


def _split_with(*, cut=20, swap=False, shuffle=False, overlap=False, pop=False, check=True, tuples=False,
                plain_slices=False):
    def split_questions(questions):
        if check and len(questions) != 40:
            raise ValueError("40 questions expected")
        if plain_slices:
            return questions[:20], questions[20:]
        if pop:
            extract = [questions.pop(0) for _ in range(20)]
            return extract, list(questions)
        qs = list(questions)
        if shuffle:
            random.Random(0).shuffle(qs)
        if overlap:
            a, b = qs[:20], qs[19:39]
        else:
            a, b = qs[:cut], qs[cut:]
        if swap:
            a, b = b, a
        return (tuple(a), tuple(b)) if tuples else (a, b)
    return split_questions


def split_islice(questions):
    import itertools

    if len(questions) != 40:
        raise ValueError(f"{len(questions)} questions")
    it = iter(questions)
    return list(itertools.islice(it, 20)), list(it)


def split_by_index(questions):
    if len(questions) != 40:
        raise ValueError("need 40")
    return [q for i, q in enumerate(questions) if i < 20], [q for i, q in enumerate(questions) if i >= 20]


def split_numpy(questions):
    if len(questions) != 40:
        raise ValueError("need 40")
    first, second = np.array_split(np.array(questions, dtype=object), 2)
    return first.tolist(), second.tolist()


def _split_mistakes():
    return (
        Mistake("swapped", _split_with(swap=True), "swapped"),
        Mistake("19 and 21", _split_with(cut=19), "each set is 20"),
        Mistake("shuffled", _split_with(shuffle=True), "do not shuffle"),
        Mistake("overlapping sets", _split_with(overlap=True), "in both sets"),
        Mistake("pops from the input", _split_with(pop=True), "changed the list"),
        Mistake("no length check", _split_with(check=False), "raise a ValueError"),
        Mistake("returns tuples", _split_with(tuples=True), "Return two lists", stage="returns a tuple of two new "
                "lists; the list it was given is left unchanged"),
        Mistake("plain slices (tuples for a tuple)", _split_with(plain_slices=True), "a slice is a tuple",
                note="right for a list; the notebook passes trait.questions, a tuple",
                stage="a tuple of questions (a trait file's Trait.questions, as the notebook passes) gives lists too"),
    )


def split_unpack(questions):
    """Star-unpacking into two lists, whatever the sequence."""
    *items, = questions
    if len(items) != 40:
        raise ValueError(f"expected 40 questions, got {len(items)}")
    return items[:20], items[20:]


# ==================================================================================================
# Exercise 2: logprob_score and judge_0_100
# ==================================================================================================

def _score_with(*, renormalise=True, argmax=False, check_range=True, threshold=True, fixed_mass=False, strict=False,
                floats=False, falsy_none=False, strip=True, parse="digits", tensor=False):
    def logprob_score(top_logprobs, min_mass=0.25):
        mass, weighted, best = 0.0, 0.0, None
        for token, logprob in top_logprobs:
            text = token.strip() if strip else token
            if not strip and not text.isdigit():
                continue
            if not floats and parse == "digits" and not (text.isascii() and text.isdigit()):
                continue
            if not floats and parse == "isdigit" and not text.isdigit():
                continue
            try:  # parse == "int": whatever int() takes ('+90' too)
                value = float(text) if floats else int(text)
            except ValueError:
                continue
            if check_range and not 0 <= value <= 100:
                continue
            p = math.exp(logprob)
            mass += p
            weighted += p * value
            if best is None or p > best[0]:
                best = (p, value)
        limit = 0.25 if fixed_mass else min_mass
        if threshold and (mass <= limit if strict else mass < limit):
            return None
        if mass == 0:
            return None
        score = best[1] if argmax else (weighted / mass if renormalise else weighted)
        if tensor:
            return torch.tensor(weighted) / torch.tensor(mass)
        return (score or None) if falsy_none else score
    return logprob_score


def score_dict(top_logprobs, min_mass=0.25):
    """Accumulates the probability of each number in a dict first."""
    probs: dict[int, float] = {}
    for token, logprob in top_logprobs:
        t = token.strip()
        if re.fullmatch(r"[0-9]{1,3}", t) and int(t) <= 100:
            probs[int(t)] = probs.get(int(t), 0.0) + math.exp(logprob)
    total = sum(probs.values())
    if total < min_mass:
        return None
    return sum(n * p for n, p in probs.items()) / total


def score_numpy(top_logprobs, min_mass=0.25):
    kept = [(int(t.strip()), lp) for t, lp in top_logprobs if t.strip().isdecimal() and t.strip().isascii()
            and int(t.strip()) <= 100]
    if not kept:
        return None
    values = np.array([v for v, _ in kept], dtype=float)
    p = np.exp(np.array([lp for _, lp in kept], dtype=float))
    return float(values @ p / p.sum()) if p.sum() >= min_mass else None


def score_logsumexp(top_logprobs, min_mass=0.25):
    """In log space with torch.logsumexp."""
    kept = [(int(t.strip()), lp) for t, lp in top_logprobs if re.fullmatch(r"\s*\d+\s*", t, re.ASCII)
            and 0 <= int(t.strip()) <= 100]
    if not kept:
        return None
    lps = torch.tensor([lp for _, lp in kept], dtype=torch.float64)
    log_mass = torch.logsumexp(lps, 0)
    if float(log_mass.exp()) < min_mass:
        return None
    weights = (lps - log_mass).exp()
    return float((weights * torch.tensor([v for v, _ in kept], dtype=torch.float64)).sum())


def _score_mistakes():
    return (
        Mistake("not divided by the integer mass", _score_with(renormalise=False), "total probability"),
        Mistake("the most likely number", _score_with(argmax=True), "most likely number"),
        Mistake("no 0..100 range", _score_with(check_range=False), "outside 0..100"),
        Mistake("no mass threshold", _score_with(threshold=False), "return None below min_mass"),
        Mistake("a fixed 0.25", _score_with(fixed_mass=True), "min_mass argument"),
        Mistake("> instead of >=", _score_with(strict=True), "compare with >="),
        Mistake("decimals accepted", _score_with(floats=True), "'7.5' is not one"),
        Mistake("a score of 0 becomes None", _score_with(falsy_none=True), "A score of 0 is a real score"),
        Mistake("tokens not stripped", _score_with(strip=False), "count every integer token"),
        Mistake("int() decides what counts", _score_with(parse="int"), "int('+90') is 90",
                stage="only whole numbers in the ASCII digits 0-9 count: not '7.5', '+90' nor full-width digits"),
        Mistake("str.isdigit() without isascii()", _score_with(parse="isdigit"), "full-width",
                stage="only whole numbers in the ASCII digits 0-9 count: not '7.5', '+90' nor full-width digits"),
        Mistake("a 0-d tensor", _score_with(tensor=True), "return a Python float",
                stage="returns a Python number (or None), not a tensor or a numpy float32"),
    )


def score_regex_float64(top_logprobs, min_mass=0.25):
    """A regular expression with re.ASCII, and numpy float64 sums (a float subclass) returned as they are."""
    pattern = re.compile(r"\d{1,3}", re.ASCII)
    mass = weighted = np.float64(0.0)
    for token, logprob in top_logprobs:
        t = token.strip()
        if pattern.fullmatch(t) and int(t) <= 100:
            mass += np.exp(np.float64(logprob))
            weighted += np.exp(np.float64(logprob)) * int(t)
    return weighted / mass if mass >= min_mass else None


def _judge_with(*, text=False, logprobs=True, top=20, max_tokens=1, model=None, system=False, refusal_zero=False,
                temperature=0.0, first_n=None, role="user", twice=False):
    def judge_0_100(client, judge_model, prompt):
        kwargs = dict(model=model or judge_model,
                      messages=([{"role": "system", "content": "You are a judge."}] if system else [])
                      + [{"role": role, "content": prompt}], max_tokens=max_tokens)
        if twice:  # a first call for the text, then one for the logprobs
            client.chat.completions.create(model=judge_model, messages=[{"role": "user", "content": prompt}])
        if temperature is not None:
            kwargs["temperature"] = temperature
        if logprobs:
            kwargs.update(logprobs=True, top_logprobs=top)
        reply = client.chat.completions.create(**kwargs)
        if text:
            return float(reply.choices[0].message.content)
        alternatives = reply.choices[0].logprobs.content[0].top_logprobs
        if first_n:
            alternatives = alternatives[:first_n]
        score = logprob_score([(a.token, a.logprob) for a in alternatives])  # noqa: F821 (the notebook's)
        return 0.0 if (score is None and refusal_zero) else score
    return judge_0_100


def judge_dict_tokens(client, judge_model, prompt):
    """Reads the alternatives through getattr and a dict."""
    reply = client.chat.completions.create(model=judge_model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, seed=0)
    first = reply.choices[0].logprobs.content[0]
    table = [(a.token, a.logprob) for a in first.top_logprobs]
    return logprob_score(table)  # noqa: F821 (the notebook's)


def judge_own_mean(client, judge_model, prompt):
    """Computes the weighted mean itself instead of calling logprob_score."""
    reply = client.chat.completions.create(model=judge_model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20)
    num = den = 0.0
    for alt in reply.choices[0].logprobs.content[0].top_logprobs:
        t = alt.token.strip()
        if t.isascii() and t.isdigit() and int(t) <= 100:
            num += math.exp(alt.logprob) * int(t)
            den += math.exp(alt.logprob)
    return num / den if den >= 0.25 else None


def judge_kwargs(client, judge_model, prompt):
    """Builds the request as a dict."""
    request = {"model": judge_model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
               "temperature": 0, "logprobs": True, "top_logprobs": 20}
    completion = client.chat.completions.create(**request)
    return logprob_score([(x.token, x.logprob) for x in completion.choices[0].logprobs.content[0].top_logprobs])  # noqa: F821


def _bind_logprob_score(fn):
    """Judge implementations call the notebook's `logprob_score`; bind the course's reference in their globals (the
    check itself swaps the reference in too, through `uses`)."""
    from utils.judges import logprob_score

    fn.__globals__.setdefault("logprob_score", lambda top, min_mass=0.25: logprob_score(top, min_mass=min_mass))
    return fn


def _judge_mistakes():
    return (
        Mistake("reads the reply's text", _bind_logprob_score(_judge_with(text=True)), "the reply's text"),
        Mistake("no logprobs requested", _bind_logprob_score(_judge_with(logprobs=False)), "logprobs=True"),
        Mistake("top_logprobs=5", _bind_logprob_score(_judge_with(top=5)), "top_logprobs=20"),
        Mistake("max_tokens=16", _bind_logprob_score(_judge_with(max_tokens=16)), "max_tokens=1"),
        Mistake("a hard-coded model", _bind_logprob_score(_judge_with(model="gpt-4o")), "model=judge_model"),
        Mistake("a system message", _bind_logprob_score(_judge_with(system=True)), "only message"),
        Mistake("a refusal scored 0", _bind_logprob_score(_judge_with(refusal_zero=True)), "expected None"),
        Mistake("no temperature", _bind_logprob_score(_judge_with(temperature=None)), "temperature=0"),
        Mistake("only the first 5 alternatives", _bind_logprob_score(_judge_with(first_n=5)), "Pass every alternative"),
        Mistake("the prompt as a system message", _bind_logprob_score(_judge_with(role="system")), "'role': 'user'",
                stage="model=judge_model, and the prompt as the only message, with the role 'user'"),
        Mistake("two calls per prompt", _bind_logprob_score(_judge_with(twice=True)), "one call gives the logprobs",
                stage="one chat.completions.create call per prompt"),
    )


# ==================================================================================================
# Exercise 3: effective_pairs
# ==================================================================================================

def _pairs_with(*, none_zero=False, neg_le=False, pos_gt=False, coherence=True, separate=False, fixed=False, as_list=False,
                check=True, rounding=False):
    def effective_pairs(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold=50.0, coherence_threshold=50.0):
        if check and len({len(pos_scores), len(neg_scores), len(pos_coherence), len(neg_coherence)}) != 1:
            raise ValueError("lengths differ")
        t = 50.0 if fixed else threshold
        ct = 50.0 if fixed else coherence_threshold

        def v(x):
            return (0.0 if x is None else x) if none_zero else x

        out = []
        for p, n, pc, nc in zip(pos_scores, neg_scores, pos_coherence, neg_coherence):
            p, n, pc, nc = v(p), v(n), v(pc), v(nc)
            if rounding and n is not None:
                n = round(n)
            ok_p = p is not None and (p > t if pos_gt else p >= t)
            ok_n = n is not None and (n <= t if neg_le else n < t)
            ok_c = (not coherence) or (pc is not None and pc >= ct and nc is not None and nc >= ct)
            out.append(ok_p and ok_n and ok_c)
        if separate:
            return torch.tensor([p is not None and p >= t for p in pos_scores if p is not None], dtype=torch.bool)
        return out if as_list else torch.tensor(out, dtype=torch.bool)
    return effective_pairs


def pairs_numpy(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold=50.0, coherence_threshold=50.0):
    """NaN for None, vectorised comparisons (NaN compares False)."""
    cols = [pos_scores, neg_scores, pos_coherence, neg_coherence]
    if len({len(c) for c in cols}) != 1:
        raise ValueError("one entry per pair in every list")
    p, n, pc, nc = (np.array([np.nan if x is None else x for x in c], dtype=float) for c in cols)
    with np.errstate(invalid="ignore"):
        keep = (p >= threshold) & (n < threshold) & (pc >= coherence_threshold) & (nc >= coherence_threshold)
    return torch.from_numpy(keep)


def pairs_all(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold=50.0, coherence_threshold=50.0):
    """all() over the tests of each row."""
    n = len(pos_scores)
    if any(len(c) != n for c in (neg_scores, pos_coherence, neg_coherence)):
        raise ValueError("lists of different lengths")
    rows = []
    for i in range(n):
        values = (pos_scores[i], neg_scores[i], pos_coherence[i], neg_coherence[i])
        rows.append(all(v is not None for v in values) and all([values[0] >= threshold, values[1] < threshold,
                                                                values[2] >= coherence_threshold,
                                                                values[3] >= coherence_threshold]))
    return torch.tensor(rows).bool()


def pairs_torch_nan(pos_scores, neg_scores, pos_coherence, neg_coherence, threshold=50.0, coherence_threshold=50.0):
    lengths = list(map(len, (pos_scores, neg_scores, pos_coherence, neg_coherence)))
    if min(lengths) != max(lengths):
        raise ValueError(f"lengths {lengths}")
    t = torch.tensor([[float("nan") if x is None else float(x) for x in col]
                      for col in (pos_scores, neg_scores, pos_coherence, neg_coherence)], dtype=torch.float64)
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return (t[0] >= threshold) & (t[1] < threshold) & (t[2] >= coherence_threshold) & (t[3] >= coherence_threshold)


def _pairs_mistakes():
    return (
        Mistake("None counted as 0", _pairs_with(none_zero=True), "None negative is no score"),
        Mistake("negative <= threshold", _pairs_with(neg_le=True), "strictly below"),
        Mistake("positive > threshold", _pairs_with(pos_gt=True), "boundaries"),
        Mistake("no coherence test", _pairs_with(coherence=False), "Both answers must be coherent"),
        Mistake("positives filtered on their own", _pairs_with(separate=True), "one entry per pair"),
        Mistake("thresholds hard-coded", _pairs_with(fixed=True), "use the threshold arguments"),
        Mistake("returns a list", _pairs_with(as_list=True), "not a list"),
        Mistake("no length check", _pairs_with(check=False), "raise a ValueError"),
        Mistake("scores rounded", _pairs_with(rounding=True), "no rounding"),
    )


# ==================================================================================================
# Exercise 4: three_averages and trait_vector
# ==================================================================================================

# Where "output[0] for every block output" is rejected depends on what the installed transformers' blocks return:
# under 5.x the model's own tensors pass the first stages (one row, batch 1) and the fake tuple-output model catches
# it; under 4.57 tiny-gemma2's blocks give a tensor that output[0] cuts to two dimensions at the first stage.
_FIRST_ELEMENT_REJECTION = (
    ("whose blocks return a tuple", "tuple block outputs (transformers 4.x) as well as tensors (5.x)")
    if int(transformers.__version__.split(".")[0]) >= 5 else
    ("number of dimensions", "{'response_avg', 'prompt_avg', 'prompt_last'} -> float32 CPU tensors [n, n_layers, d_model]"))


# A hook that adds the vector to a block's output as it is: under 5.x the fake tuple-output model catches it; under
# 4.57 tiny-gemma2's own blocks return tuples, and the first steered stage does.
_TENSOR_HOOK_REJECTION = (
    ("(output[0] + vector, *output[1:])",
     "on blocks that return tuples (transformers 4.x): the vector added to the hidden state, output[0]")
    if int(transformers.__version__.split(".")[0]) >= 5 else
    ("raised TypeError", "with a vector: +vector added to block `layer`'s output while the forward pass runs"))


def _averages_with(*, shift=1, hidden_states=False, with_eot=False, last_at_start=False, three_passes=False,
                   bf16=False, keep_hooks=False, sort_rows=False, layers_first=False, first_element=False,
                   model_dtype=False):
    def three_averages(model, tokenizer, conversations):
        from utils.conversation import response_token_span

        n_layers, d = len(model.model.layers), model.config.hidden_size
        out = {k: torch.zeros(len(conversations), n_layers, d) for k in ("response_avg", "prompt_avg", "prompt_last")}
        order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i]))) if sort_rows \
            else list(range(len(conversations)))
        grabbed = {}
        def grab(k, o):
            if first_element:  # output[0]: batch row 0 of a 5.x tensor, but the whole hidden state of a 4.x tuple
                grabbed[k] = o[0]
            else:
                grabbed[k] = (o[0] if isinstance(o, tuple) else o)[0]

        handles = [] if hidden_states else [
            blk.register_forward_hook(lambda m, a, o, k=k: grab(k, o)) for k, blk in enumerate(model.model.layers)]
        try:
            for row, i in enumerate(order):
                ids, start, end = response_token_span(conversations[i], tokenizer)
                fed = ids if with_eot else ids[:end]
                passes = 3 if three_passes else 1
                for _ in range(passes):
                    result = model(input_ids=torch.tensor([fed]), output_hidden_states=hidden_states)
                for k in range(n_layers):
                    h = result.hidden_states[k + shift][0] if hidden_states else grabbed[k]
                    h = h.bfloat16() if bf16 else h if model_dtype else h.float()
                    r_end = len(fed) if with_eot else end
                    out["response_avg"][row, k] = h[start:r_end].mean(0).float()
                    out["prompt_avg"][row, k] = h[:start].mean(0).float()
                    out["prompt_last"][row, k] = h[start if last_at_start else start - 1].float()
        finally:
            if not keep_hooks:
                for handle in handles:
                    handle.remove()
        return {k: v.transpose(0, 1) for k, v in out.items()} if layers_first else out
    return three_averages


def averages_batched(model, tokenizer, conversations):
    """Left-padded batches, an attention mask and position ids, masks built from each row's span."""
    from utils.conversation import response_token_span

    items = [response_token_span(m, tokenizer) for m in conversations]
    width = max(e for _, _, e in items)
    n, n_layers = len(items), len(model.model.layers)
    ids = torch.zeros(n, width, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    resp, prompt, last = (torch.zeros(n, width) for _ in range(3))
    for r, (tok, s, e) in enumerate(items):
        off = width - e
        ids[r, off:] = torch.tensor(tok[:e])
        attn[r, off:] = 1
        resp[r, off + s:off + e] = 1
        prompt[r, off:off + s] = 1
        last[r, off + s - 1] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    store = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, k=k: store.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, blk in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attn, position_ids=pos)
    finally:
        for h in hooks:
            h.remove()
    stacked = torch.stack([store[k].float() for k in range(n_layers)], dim=1)  # [n, L, seq, d]

    def masked_mean(mask):
        return torch.einsum("nlsd,ns->nld", stacked, mask) / mask.sum(1)[:, None, None]

    return {"response_avg": masked_mean(resp), "prompt_avg": masked_mean(prompt), "prompt_last": masked_mean(last)}


def averages_numpy(model, tokenizer, conversations):
    """One pass per conversation, block outputs collected in a list, numpy means."""
    from utils.conversation import response_token_span

    rows = {"response_avg": [], "prompt_avg": [], "prompt_last": []}
    for messages in conversations:
        ids, start, end = response_token_span(messages, tokenizer)
        outs = []
        hooks = [blk.register_forward_hook(lambda m, a, o, outs=outs: outs.append((o[0] if isinstance(o, tuple) else o)[0]
                                                                                  .double().numpy()))
                 for blk in model.model.layers]
        try:
            with torch.inference_mode():
                model(input_ids=torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        h = np.stack(outs)  # [L, seq, d]
        rows["response_avg"].append(h[:, start:end].mean(1))
        rows["prompt_avg"].append(h[:, :start].mean(1))
        rows["prompt_last"].append(h[:, start - 1])
    return {k: torch.tensor(np.stack(v), dtype=torch.float32) for k, v in rows.items()}


def averages_model_model(model, tokenizer, conversations):
    """Runs the decoder stack (model.model) only, with a context manager for the hooks."""
    from utils.conversation import response_token_span

    @contextlib.contextmanager
    def hooked(layers, store):
        handles = [layer.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, o[0] if isinstance(o, tuple)
                                                                                       else o))
                   for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    results = {name: [] for name in ("response_avg", "prompt_avg", "prompt_last")}
    for messages in conversations:
        ids, start, end = response_token_span(messages, tokenizer)
        store = {}
        with hooked(model.model.layers, store), torch.no_grad():
            model.model(input_ids=torch.tensor([ids[:end]]))
        acts = torch.stack([store[i][0].float() for i in sorted(store)])  # [L, seq, d]
        results["response_avg"].append(acts[:, start:end].mean(1))
        results["prompt_avg"].append(acts[:, :start].mean(1))
        results["prompt_last"].append(acts[:, start - 1])
    return {k: torch.stack(v) for k, v in results.items()}


def _averages_mistakes():
    return (
        Mistake("hidden_states[l] (one block early)", _averages_with(hidden_states=True, shift=0), "one block early"),
        Mistake("hidden_states[l + 1] for the last layer too", _averages_with(hidden_states=True, shift=1),
                "final norm applied"),
        Mistake("the end-of-turn tokens in the response", _averages_with(with_eot=True), "content tokens only"),
        Mistake("the last prompt token at the answer's start", _averages_with(last_at_start=True), "FIRST token"),
        Mistake("a pass per average", _averages_with(three_passes=True), "forward passes"),
        Mistake("means in bf16", _averages_with(bf16=True), "float32",
                stage="the means taken in float32 (a bf16 model's block outputs converted first)"),
        Mistake("means in the model's dtype", _averages_with(model_dtype=True), "the mean was taken in bf16",
                note="right on a float32 model; on a bf16 one the means are bf16 numbers",
                stage="the means taken in float32 (a bf16 model's block outputs converted first)"),
        Mistake("hooks left registered", _averages_with(keep_hooks=True), "still had hooks"),
        Mistake("rows sorted by length", _averages_with(sort_rows=True), "out of order"),
        Mistake("layers first, [n_layers, n, d_model]", _averages_with(layers_first=True), "[n, n_layers, d_model]",
                stage="{'response_avg', 'prompt_avg', 'prompt_last'} -> float32 CPU tensors [n, n_layers, d_model]"),
        Mistake("output[0] for every block output", _averages_with(first_element=True),
                message=_FIRST_ELEMENT_REJECTION[0], stage=_FIRST_ELEMENT_REJECTION[1],
                note="output[0] of 5.x's tensor is batch row 0; on 4.x's tuples it is the whole hidden state"),
    )


def _vector_with(*, sign=1.0, normalise=False, median=False, over_layers=False, keep_dtype=False, total=False,
                 cast_after=False):
    def trait_vector(pos, neg):
        if cast_after:
            return (pos.mean(0) - neg.mean(0)).float()
        if median:
            return pos.float().median(0).values - neg.float().median(0).values
        p, n = (pos, neg) if keep_dtype else (pos.float(), neg.float())
        v = sign * ((p.sum(0) if total else p.mean(0)) - (n.sum(0) if total else n.mean(0)))
        if normalise:
            v = v / v.norm(dim=-1, keepdim=True)
        if over_layers:
            v = v.mean(0)
        return v
    return trait_vector


def vector_einops(pos, neg):
    import einops

    return einops.reduce(pos.float(), "n l d -> l d", "mean") - einops.reduce(neg.float(), "n l d -> l d", "mean")


def vector_numpy(pos, neg):
    return torch.from_numpy(pos.float().numpy().mean(axis=0) - neg.float().numpy().mean(axis=0))


def vector_sub(pos, neg):
    return torch.sub(torch.mean(pos.to(torch.float32), dim=0), torch.mean(neg.to(torch.float32), dim=0))


def _vector_mistakes():
    return (
        Mistake("neg - pos", _vector_with(sign=-1.0), "sign is flipped"),
        Mistake("normalised per layer", _vector_with(normalise=True), "normalised"),
        Mistake("medians", _vector_with(median=True), "medians"),
        Mistake("averaged over the layers too", _vector_with(over_layers=True), "averaged over the layers"),
        Mistake("kept the input dtype", _vector_with(keep_dtype=True), "Return float32",
                stage="any float dtype in (bf16 too), float32 out, computed in float32"),
        Mistake("means in bf16, cast afterwards", _vector_with(cast_after=True), "computed in bf16",
                stage="any float dtype in (bf16 too), float32 out, computed in float32"),
        Mistake("sums instead of means", _vector_with(total=True), "expected"),
    )


# ==================================================================================================
# Exercise 5: spread_scaled_vectors and layer_sweep
# ==================================================================================================

def _spread_with(*, correction=1, normalise=True, scale_unit=True, variance=False, norms=False, use_multiple=True,
                 all_layers=False, as_list=False, dtype="float32"):
    def spread_scaled_vectors(vectors, activations, layers, multiple):
        out = {}
        for layer in layers:
            v = vectors[layer] if dtype != "float32" else vectors[layer].float()
            unit = v / v.norm()
            acts = activations.flatten(0, 1) if all_layers else activations[:, layer]
            proj = (acts if dtype != "float32" else acts.float()) @ (unit if normalise else v)
            if dtype == "cast after":
                proj, unit = proj.float(), unit.float()
            if norms:
                proj = activations[:, layer].norm(dim=-1)
            spread = proj.var(correction=correction) if variance else proj.std(correction=correction)
            m = multiple if use_multiple else 1.0
            out[layer] = m * spread * (unit if (scale_unit and normalise) else v)
        return list(out.values()) if as_list else out
    return spread_scaled_vectors


def spread_numpy(vectors, activations, layers, multiple):
    out = {}
    for layer in layers:
        v = vectors[layer].double().numpy()
        u = v / np.linalg.norm(v)
        spread = np.std(activations[:, layer].double().numpy() @ u, ddof=1)
        out[layer] = torch.from_numpy(multiple * spread * u).float()
    return out


def spread_manual(vectors, activations, layers, multiple):
    """The sample standard deviation written out."""
    result = {}
    for layer in layers:
        unit = F.normalize(vectors[layer].float(), dim=0)
        x = activations[:, layer].float() @ unit
        sd = torch.sqrt(((x - x.mean()) ** 2).sum() / (len(x) - 1))
        result[layer] = unit * sd * multiple
    return result


def spread_statistics(vectors, activations, layers, multiple):
    result = {}
    for layer in layers:
        unit = vectors[layer].double() / torch.linalg.vector_norm(vectors[layer].double())
        sd = statistics.stdev((activations[:, layer].double() @ unit).tolist())
        result[layer] = (multiple * sd) * unit.float()
    return result


def _spread_mistakes():
    return (
        Mistake("population std", _spread_with(correction=0), "population standard deviation"),
        Mistake("projections on the raw vector", _spread_with(normalise=False), "Normalise the vector first"),
        Mistake("the raw vector scaled", _spread_with(scale_unit=False), "UNIT vector"),
        Mistake("the variance", _spread_with(variance=True), "variance"),
        Mistake("the spread of the norms", _spread_with(norms=True), "not of the activations' norms"),
        Mistake("multiple ignored", _spread_with(use_multiple=False), "Multiply by `multiple`"),
        Mistake("every layer's activations", _spread_with(all_layers=True), "activations at layer"),
        Mistake("returns a list", _spread_with(as_list=True), "Return a dict"),
        Mistake("the input dtype kept", _spread_with(dtype="input"), "return float32",
                stage="bf16 vectors and activations: float32 out, computed in float32"),
        Mistake("projections in bf16, cast afterwards", _spread_with(dtype="cast after"), "computed in bf16",
                stage="bf16 vectors and activations: float32 out, computed in float32"),
    )


def _sweep_with(*, shift=0, outside=False, none_zero=False, keep_hooks=False, none_as_zero_mean=False,
                swap_args=False, temperature=0.0, judge_twice=False, str_keys=False):
    def layer_sweep(model, tokenizer, questions, vectors, judge, max_new_tokens):
        from utils.conversation import chat_messages
        from utils.generation import generate
        from utils.steering import steering

        prompts = [chat_messages("", q) for q in questions]
        out = {}
        for layer, vector in vectors.items():
            if keep_hooks:
                v = vector

                def hook(module, args, output, v=v):
                    h = output[0] if isinstance(output, tuple) else output
                    return (h + v,) + tuple(output[1:]) if isinstance(output, tuple) else h + v
                model.model.layers[layer + shift].register_forward_hook(hook)
                answers = generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature)
            elif outside:
                with steering(model, {layer + shift: vector}):
                    pass
                answers = generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature)
            else:
                with steering(model, {layer + shift: vector}):
                    answers = generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature)
            scores = [judge(a, q) if swap_args else judge(q, a) for q, a in zip(questions, answers)]
            if judge_twice:
                scores = [judge(q, a) for q, a in zip(questions, answers)]
            if none_as_zero_mean:
                kept = [s for s in scores if s is not None]
                out[layer] = sum(kept) / len(kept) if kept else 0.0
            else:
                values = [0.0 if s is None else s for s in scores] if none_zero else [s for s in scores if s is not None]
                out[layer] = (sum(values) / len(values)) if values else None
        return {str(k): v for k, v in out.items()} if str_keys else out
    return layer_sweep


def sweep_one_by_one(model, tokenizer, questions, vectors, judge, max_new_tokens):
    """One question per generate call, statistics.fmean."""
    from utils.conversation import chat_messages
    from utils.generation import generate
    from utils.steering import steering

    result = {}
    for layer in vectors:
        scores = []
        for q in questions:
            with steering(model, {layer: vectors[layer]}):
                answer = generate(model, tokenizer, [chat_messages("", q)], max_new_tokens, temperature=0.0)[0]
            s = judge(q, answer)
            if s is not None:
                scores.append(s)
        result[layer] = statistics.fmean(scores) if scores else None
    return result


def sweep_own_hook(model, tokenizer, questions, vectors, judge, max_new_tokens):
    """Its own forward hook, removed in finally."""
    from utils.generation import generate

    out = {}
    for layer, vec in vectors.items():
        def add(module, args, output, vec=vec):
            if isinstance(output, tuple):
                return (output[0] + vec.to(output[0].dtype),) + output[1:]
            return output + vec.to(output.dtype)
        handle = model.model.layers[layer].register_forward_hook(add)
        try:
            answers = generate(model, tokenizer, [[{"role": "user", "content": q}] for q in questions], max_new_tokens,
                               temperature=0.0)
        finally:
            handle.remove()
        judged = [x for x in map(judge, questions, answers) if x is not None]
        out[layer] = float(np.mean(judged)) if judged else None
    return out


def sweep_intervene(model, tokenizer, questions, vectors, judge, max_new_tokens):
    """utils.steering.intervene(add=...) and a system-prompt-free conversation built by hand."""
    from utils.generation import generate
    from utils.steering import intervene

    convs = [[{"role": "system", "content": ""}, {"role": "user", "content": q}] for q in questions]
    means = {}
    for layer in sorted(vectors):
        with intervene(model, add={layer: vectors[layer]}, positions="all"):
            answers = generate(model, tokenizer, convs, max_new_tokens, temperature=0)
        got = [(q, a) for q, a in zip(questions, answers)]
        vals = list(filter(lambda s: s is not None, (judge(q, a) for q, a in got)))
        means[layer] = sum(vals) / len(vals) if vals else None
    return means


def _sweep_mistakes():
    return (
        Mistake("steers the next block", _sweep_with(shift=1), "steer the block of the key"),
        Mistake("generates after the with-block", _sweep_with(outside=True), "unsteered score"),
        Mistake("None counted as 0", _sweep_with(none_zero=True), "counted the unscored answer"),
        Mistake("hooks never removed", _sweep_with(keep_hooks=True), "still had hooks"),
        Mistake("0 when nothing is scored", _sweep_with(none_as_zero_mean=True), "should be None"),
        Mistake("judge(answer, question)", _sweep_with(swap_args=True), "question first"),
        Mistake("sampled, not greedy", _sweep_with(temperature=0.9), "Answer greedily"),
        Mistake("judges every answer twice", _sweep_with(judge_twice=True), "called"),
        Mistake("the layers as strings (for JSON)", _sweep_with(str_keys=True), "with the layers of `vectors`",
                stage="a dict {layer: mean score} with the layers of `vectors`"),
    )


# ==================================================================================================
# Exercise 6: steer_positions
# ==================================================================================================

def _positions_with(*, response_all=False, response_first=False, prompt_always=False, prompt_never=False,
                    in_place=False, cast=True, none_noop=False, check=True, prompt_but_last=False, move=True):
    def steer_positions(h, vector, positions):
        if check and positions not in ("all", "prompt", "response"):
            raise ValueError(positions)
        v = (vector.to(device=h.device, dtype=h.dtype) if move else vector.to(h.dtype)) if cast else vector
        seq = h.shape[1]
        if positions == "all":
            return h + v
        if positions == "prompt":
            if prompt_but_last and seq > 1:
                return torch.cat([h[:, :-1] + v, h[:, -1:]], dim=1)
            if (seq > 1 and not prompt_never) or prompt_always:
                return h + v
            return None if none_noop else h.clone()
        if response_all:
            return h + v
        out = h if in_place else h.clone()
        out[:, 0 if response_first else -1] += v
        return out
    return steer_positions


def positions_where(h, vector, positions):
    """A position mask and torch.where."""
    if positions not in {"all", "prompt", "response"}:
        raise ValueError(f"unknown positions {positions!r}")
    seq = h.shape[1]
    if positions == "all":
        mask = torch.ones(seq, dtype=torch.bool)
    elif positions == "prompt":
        mask = torch.full((seq,), seq > 1)
    else:
        mask = torch.arange(seq) == seq - 1
    mask = mask.to(h.device)[None, :, None]
    return torch.where(mask, h + vector.to(h.device, h.dtype), h)


def positions_slices(h, vector, positions):
    """Slices and torch.cat."""
    v = vector.to(dtype=h.dtype, device=h.device)
    match positions:
        case "all":
            return h + v
        case "prompt":
            return h + v if h.size(1) > 1 else h.detach().clone()
        case "response":
            return torch.cat((h[:, :-1], h[:, -1:] + v), dim=1)
        case _:
            raise ValueError("positions must be all, prompt or response")


def positions_scale(h, vector, positions):
    """A 0/1 weight per position, multiplied in."""
    if positions not in ("all", "prompt", "response"):
        raise ValueError(positions)
    seq = h.shape[-2]
    weight = torch.zeros(seq, dtype=h.dtype, device=h.device)
    if positions == "all" or (positions == "prompt" and seq > 1):
        weight[:] = 1
    elif positions == "response":
        weight[-1] = 1
    return h + weight[None, :, None] * vector.to(h.device, h.dtype)[None, None, :]


def _positions_mistakes():
    return (
        Mistake("response steers everything", _positions_with(response_all=True), "only the LAST position"),
        Mistake("response steers the first position", _positions_with(response_first=True), "not the first"),
        Mistake("prompt steers the new tokens too", _positions_with(prompt_always=True), "leaves single-position passes"),
        Mistake("prompt never steers", _positions_with(prompt_never=True), "steers every position of a pass"),
        Mistake("in place", _positions_with(in_place=True), "in place"),
        Mistake("vector not cast", _positions_with(cast=False), "cast the vector"),
        Mistake("None for no change", _positions_with(none_noop=True), "never None"),
        Mistake("no error for an unknown mode", _positions_with(check=False), "raise a ValueError"),
        Mistake("prompt leaves its last position", _positions_with(prompt_but_last=True), "its last one too"),
        Mistake("the vector cast but not moved", _positions_with(move=False), "Move the vector to h's device",
                stage="h on another device than the vector (device_map=\"auto\"): the result on h's device"),
    )


# ==================================================================================================
# Exercise 7: monitoring_correlations
# ==================================================================================================

def _pearson(x, y):
    if len(x) < 3:
        return None
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx, dy = x - x.mean(), y - y.mean()
    d = math.sqrt(float((dx ** 2).sum() * (dy ** 2).sum()))
    return None if d == 0 else float((dx * dy).sum() / d)


def _monitor_with(*, spearman=False, misalign=False, nan=False, skip_empty=False, n_all=False, within_zero=False,
                  zero_small=False, numpy_counts=False):
    def monitoring_correlations(projections, scores, conditions):
        def corr(x, y):
            if spearman and len(x) >= 3:
                from scipy.stats import spearmanr

                r = spearmanr(x, y).correlation
                return None if r != r else float(r)
            r = _pearson(x, y)
            if r is None and nan and len(x) >= 3:
                return float("nan")
            if r is None and zero_small:
                return 0.0
            return r

        keep = [i for i, s in enumerate(scores) if s is not None]
        if misalign:
            x = [float(p) for p in projections[:len(keep)]]
        else:
            x = [float(projections[i]) for i in keep]
        y = [float(scores[i]) for i in keep]
        out = {"overall": corr(x, y), "n": len(scores) if n_all else len(keep), "within": {}, "n_within": {}}
        for c in dict.fromkeys(conditions):
            if within_zero:
                idx = [i for i in range(len(scores)) if conditions[i] == c]
                xs = [float(projections[i]) for i in idx]
                ys = [0.0 if scores[i] is None else float(scores[i]) for i in idx]
            else:
                idx = [k for k, i in enumerate(keep) if conditions[i] == c]
                xs, ys = [x[k] for k in idx], [y[k] for k in idx]
            if skip_empty and not idx:
                continue
            out["within"][c] = corr(xs, ys)
            out["n_within"][c] = len(idx) if not within_zero else len([i for i in idx if scores[i] is not None])
        if numpy_counts:  # counted with numpy masks
            mask = np.array([s is not None for s in scores])
            out["n"] = mask.sum()
            out["n_within"] = {c: (mask & (np.array(conditions) == c)).sum() for c in out["n_within"]}
        return out
    return monitoring_correlations


def monitor_scipy(projections, scores, conditions):
    from scipy.stats import pearsonr

    pts = [(float(p), float(s), c) for p, s, c in zip(projections.tolist(), scores, conditions) if s is not None]

    def r(points):
        xs, ys = [a for a, _, _ in points], [b for _, b, _ in points]
        if len(points) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
            return None
        return float(pearsonr(xs, ys)[0])

    names = list(dict.fromkeys(conditions))
    return {"overall": r(pts), "n": len(pts), "within": {c: r([p for p in pts if p[2] == c]) for c in names},
            "n_within": {c: sum(p[2] == c for p in pts) for c in names}}


def monitor_corrcoef(projections, scores, conditions):
    mask = np.array([s is not None for s in scores])
    x = projections.double().numpy()[mask]
    y = np.array([s for s in scores if s is not None], dtype=float)
    c = np.array(conditions, dtype=object)[mask]

    def r(a, b):
        if len(a) < 3 or a.std() == 0 or b.std() == 0:
            return None
        return float(np.corrcoef(a, b)[0, 1])

    within, counts = {}, {}
    for name in dict.fromkeys(conditions):
        sel = c == name
        within[name], counts[name] = r(x[sel], y[sel]), int(sel.sum())
    return {"overall": r(x, y), "n": int(mask.sum()), "within": within, "n_within": counts}


def monitor_statistics(projections, scores, conditions):
    groups: dict[str, list[tuple[float, float]]] = {c: [] for c in conditions}
    everything = []
    for p, s, c in zip(projections.tolist(), scores, conditions):
        if s is not None:
            groups[c].append((p, s))
            everything.append((p, s))

    def r(pairs):
        if len(pairs) < 3:
            return None
        xs, ys = zip(*pairs)
        try:
            return statistics.correlation(xs, ys)
        except statistics.StatisticsError:
            return None

    return {"overall": r(everything), "n": len(everything), "within": {c: r(v) for c, v in groups.items()},
            "n_within": {c: len(v) for c, v in groups.items()}}


def _monitor_mistakes():
    return (
        Mistake("Spearman's rank correlation", _monitor_with(spearman=True), "Spearman"),
        Mistake("None dropped from the scores only", _monitor_with(misalign=True), "no longer line up"),
        Mistake("NaN for no spread", _monitor_with(nan=True), "not NaN"),
        Mistake("unscored conditions left out", _monitor_with(skip_empty=True), "should list every condition"),
        Mistake("n counts every point", _monitor_with(n_all=True), "'n' should count"),
        Mistake("None scored 0 within conditions", _monitor_with(within_zero=True), "unscored point"),
        Mistake("0 for too few points", _monitor_with(zero_small=True), "should be None"),
        Mistake("numpy integer counts", _monitor_with(numpy_counts=True), "return a Python int",
                stage="'n' and 'n_within' are Python ints (the summary writes them to JSON as they are)"),
    )


# ==================================================================================================
# Exercise 8: cosine_matrix and cosine_with_axis
# ==================================================================================================

def _cosines_with(*, normalise=True, centre=False, sort=False, keep_dtype=False, matrix_only=False,
                  own_dtype=False):
    def cosine_matrix(vectors):
        names = sorted(vectors) if sort else list(vectors)
        if own_dtype:  # each vector normalised in its own dtype, then converted
            unit = torch.stack([(vectors[n] / vectors[n].norm()).float() for n in names])
            return unit @ unit.T, names
        x = torch.stack([vectors[n] if keep_dtype else vectors[n].float() for n in names])
        if keep_dtype:
            x = x.to(torch.bfloat16)
        if centre:
            x = x - x.mean(0)
        if normalise:
            x = x / x.norm(dim=-1, keepdim=True)
        m = x @ x.T
        return m if matrix_only else (m, names)
    return cosine_matrix


def cosines_normalize(vectors):
    names = list(vectors.keys())
    unit = F.normalize(torch.stack([vectors[k].to(torch.float32) for k in names]), dim=1)
    return torch.einsum("id,jd->ij", unit, unit), names


def cosines_pairwise(vectors):
    names = [*vectors]
    x = torch.stack([v.float() for v in vectors.values()])
    return F.cosine_similarity(x[:, None, :], x[None, :, :], dim=-1), names


def cosines_numpy(vectors):
    names = list(vectors)
    x = np.stack([vectors[n].double().numpy() for n in names])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x @ x.T).float(), names


def _cosine_mistakes():
    return (
        Mistake("dot products", _cosines_with(normalise=False), "dot products"),
        Mistake("centred first", _cosines_with(centre=True), "centred"),
        Mistake("names sorted", _cosines_with(sort=True), "dict's order"),
        Mistake("bf16 cosines", _cosines_with(keep_dtype=True), "float32",
                stage="any float dtype in (bf16 too, mixed too), float32 out, computed in float32"),
        Mistake("each vector normalised in its own dtype", _cosines_with(own_dtype=True), "computed in bf16",
                stage="any float dtype in (bf16 too, mixed too), float32 out, computed in float32"),
        Mistake("the matrix alone", _cosines_with(matrix_only=True), "Return (matrix, names)"),
    )


def _axis_with(*, axis_shift=0, vector_shift=0, absolute=False, dot=False, fixed=None, only_axis_norm=False,
               tensors=False, as_list=False):
    def cosine_with_axis(trait_vectors_by_name, axis, layers):
        if tensors:  # F.cosine_similarity's 0-d tensors, kept
            return {name: F.cosine_similarity(vecs[layers[name]].float(), axis[layers[name]].float(), dim=0)
                    for name, vecs in trait_vectors_by_name.items()}
        out = {}
        for name, vectors in trait_vectors_by_name.items():
            at = next(iter(layers.values())) if fixed == "first" else layers[name]
            v, a = vectors[at + vector_shift].float(), axis[at + axis_shift].float()
            if dot:
                c = float(v @ a)
            elif only_axis_norm:
                c = float(v @ (a / a.norm()))
            else:
                c = float(v @ a / (v.norm() * a.norm()))
            out[name] = abs(c) if absolute else c
        return list(out.values()) if as_list else out
    return cosine_with_axis


def axis_cosine_similarity(trait_vectors_by_name, axis, layers):
    return {name: F.cosine_similarity(vecs[layers[name]].float(), axis[layers[name]].float(), dim=0).item()
            for name, vecs in trait_vectors_by_name.items()}


def axis_numpy(trait_vectors_by_name, axis, layers):
    out = {}
    for name, vecs in trait_vectors_by_name.items():
        v = vecs[layers[name]].double().numpy()
        a = axis[layers[name]].double().numpy()
        out[name] = float(np.dot(v, a) / (np.linalg.norm(v) * np.linalg.norm(a)))
    return out


def axis_unit_dot(trait_vectors_by_name, axis, layers):
    result = {}
    for name in trait_vectors_by_name:
        layer = layers[name]
        v = F.normalize(trait_vectors_by_name[name][layer].float(), dim=0)
        a = F.normalize(axis[layer].float(), dim=0)
        result[name] = torch.dot(v, a).item()
    return result


def _axis_mistakes():
    return (
        Mistake("the axis one row early", _axis_with(axis_shift=-1), "one row off"),
        Mistake("the trait vector one row early", _axis_with(vector_shift=-1), "trait vector is one row off"),
        Mistake("absolute cosines", _axis_with(absolute=True), "Keep the sign"),
        Mistake("dot products", _axis_with(dot=True), "dot product"),
        Mistake("one layer for every trait", _axis_with(fixed="first"), "own layer"),
        Mistake("only the axis normalised", _axis_with(only_axis_norm=True), "trait vector's norm"),
        Mistake("0-d tensors, not floats", _axis_with(tensors=True), "return a Python float",
                stage="each cosine a Python float (the summary writes them to JSON as they are)"),
        Mistake("a list in the dict's order", _axis_with(as_list=True), "for every trait",
                stage="a dict {trait: cosine} with every trait"),
    )


def axis_float64(trait_vectors_by_name, axis, layers):
    """float64 numpy arithmetic; the numpy float64 results (a float subclass) returned as they are."""
    out = {}
    for name, vecs in trait_vectors_by_name.items():
        v = vecs[layers[name]].double().numpy()
        a = axis[layers[name]].double().numpy()
        out[name] = v @ a / np.sqrt((v @ v) * (a @ a))
    return out


# ==================================================================================================
# Exercise 9: projection_differences
# ==================================================================================================

def _delta_with(*, unit=True, sign=1.0, absolute=False, norms=False, swap=False, single=False, in_place=False,
                tensors=False):
    def projection_differences(dataset, own, prompt_last, vector):
        if tensors:  # the two means as 0-d tensors
            u = vector.float() / vector.float().norm()
            return ((dataset.float() - own.float()) @ u).mean(), ((dataset.float() - prompt_last.float()) @ u).mean()
        if in_place:
            vector /= vector.norm()
            v = vector
        else:
            v = vector / vector.norm() if unit else vector

        def delta(a, b):
            if norms:
                return float((a.norm(dim=-1) - b.norm(dim=-1)).mean())
            d = sign * ((a - b) @ v)
            return float(d.abs().mean() if absolute else d.mean())

        full, cheap = delta(dataset, own), delta(dataset, prompt_last)
        if swap:
            full, cheap = cheap, full
        return full if single else (full, cheap)
    return projection_differences


def delta_einsum(dataset, own, prompt_last, vector):
    u = vector.float() / torch.linalg.norm(vector.float())
    d, o, p = dataset.float(), own.float(), prompt_last.float()
    return torch.einsum("nd,d->n", d - o, u).mean().item(), torch.einsum("nd,d->n", d - p, u).mean().item()


def delta_numpy(dataset, own, prompt_last, vector):
    u = vector.double().numpy()
    u = u / np.linalg.norm(u)
    d, o, p = (t.double().numpy() for t in (dataset, own, prompt_last))
    return float(np.mean(d @ u - o @ u)), float(np.mean(d @ u - p @ u))


def delta_loop(dataset, own, prompt_last, vector):
    u = F.normalize(vector.float(), dim=0)
    full = cheap = 0.0
    for i in range(dataset.shape[0]):
        full += float(torch.dot(dataset[i].float() - own[i].float(), u))
        cheap += float(torch.dot(dataset[i].float() - prompt_last[i].float(), u))
    return full / dataset.shape[0], cheap / dataset.shape[0]


def _delta_mistakes():
    return (
        Mistake("the raw vector", _delta_with(unit=False), "UNIT vector"),
        Mistake("own minus dataset", _delta_with(sign=-1.0), "sign is flipped"),
        Mistake("absolute differences", _delta_with(absolute=True), "no abs"),
        Mistake("difference of norms", _delta_with(norms=True), "do not compare norms"),
        Mistake("the two variants swapped", _delta_with(swap=True), "compares the dataset with"),
        Mistake("only delta_p", _delta_with(single=True), "Return a tuple"),
        Mistake("normalises the vector in place", _delta_with(in_place=True), "changed its inputs",
                stage="its inputs left unchanged"),
        Mistake("0-d tensors, not floats", _delta_with(tensors=True), "return Python floats",
                stage="returns (delta_p, delta_p_last) as Python floats (the summary writes them to JSON as they are)"),
        Mistake("bf16 arithmetic", _delta_with(), "computed in bf16", note="no .float(): the bf16 inputs' arithmetic",
                stage="bf16 inputs: float32 arithmetic (the values of the same inputs given in float32)"),
    )


# ==================================================================================================
# Exercise 10: preventative_loss
# ==================================================================================================

def _loss_with(*, all_tokens=False, unshifted=False, weights_early=False, per_sequence=False, no_positions=False,
               no_grad=False, outside=False, sign=1.0, shift=0, keep_hook=False, as_float=False, logits_dtype="float32",
               tensor_hook=False):
    def preventative_loss(model, batch, layer=None, vector=None):
        from utils.steering import steering

        def forward():
            kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            if not no_positions:
                kwargs["position_ids"] = batch["position_ids"]
            logits = model(**kwargs).logits
            return logits.float() if logits_dtype == "float32" else logits

        def loss_of(logits):
            ids = batch["input_ids"]
            mask = batch["attention_mask"].float() if all_tokens else batch["response_mask"].float()
            if unshifted:
                lg, tg, w = logits, ids, mask
            else:
                lg, tg, w = logits[:, :-1], ids[:, 1:], (mask[:, :-1] if weights_early else mask[:, 1:])
            ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="none").reshape(tg.shape)
            w = w.to(ce.dtype)
            if per_sequence:
                out = ((ce * w).sum(1) / w.sum(1)).mean()
            else:
                out = (ce * w).sum() / w.sum()
            return out.float() if logits_dtype == "cast after" else out

        ctx = torch.no_grad() if no_grad else contextlib.nullcontext()
        with ctx:
            if vector is None:
                result = loss_of(forward())
            elif keep_hook:
                v = sign * vector
                model.model.layers[layer + shift].register_forward_hook(
                    lambda m, a, o: (o[0] + v,) + tuple(o[1:]) if isinstance(o, tuple) else o + v)
                result = loss_of(forward())
            elif outside:
                with steering(model, {layer: vector}):
                    pass
                result = loss_of(forward())
            elif tensor_hook:  # a hand-written hook, removed in finally
                def add(module, args, output):
                    return output + vector  # a tuple + a tensor: TypeError under 4.x
                handle = model.model.layers[layer].register_forward_hook(add)
                try:
                    result = loss_of(forward())
                finally:
                    handle.remove()
            else:
                with steering(model, {layer + shift: sign * vector}):
                    result = loss_of(forward())
        return float(result) if as_float else result
    return preventative_loss


def loss_ignore_index(model, batch, layer=None, vector=None):
    """Labels with -100 outside the answers and F.cross_entropy's mean over the rest."""
    from utils.steering import steering

    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)[:, 1:]
    ctx = steering(model, {layer: vector}) if vector is not None else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def loss_hf_labels(model, batch, layer=None, vector=None):
    """transformers' own shifted loss (labels=...), with a hand-written hook removed in finally."""
    labels = batch["input_ids"].clone()
    labels[batch["response_mask"] == 0] = -100
    handle = None
    if vector is not None:
        def add(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h + vector.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        handle = model.model.layers[layer].register_forward_hook(add)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], labels=labels, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    return out.loss.float()


def loss_log_softmax(model, batch, layer=None, vector=None):
    """log_softmax and gather, the steering through utils.steering.intervene."""
    from utils.steering import intervene

    def run():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False).logits

    if vector is None:
        logits = run()
    else:
        with intervene(model, add={layer: vector}):
            logits = run()
    logp = torch.log_softmax(logits.float()[:, :-1], dim=-1)
    picked = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    w = batch["response_mask"][:, 1:].float()
    return -(picked * w).sum() / w.sum()


def _loss_mistakes():
    return (
        Mistake("every token a target", _loss_with(all_tokens=True), "only the answer's tokens"),
        Mistake("no shift", _loss_with(unshifted=True), "predicts token t + 1"),
        Mistake("the mask of the predicting position", _loss_with(weights_early=True), "TARGET"),
        Mistake("mean per sequence first", _loss_with(per_sequence=True), "not per sequence first"),
        Mistake("under no_grad", _loss_with(no_grad=True), "no autograd graph"),
        Mistake("forward pass after the steering", _loss_with(outside=True), "WHILE the forward pass"),
        Mistake("the vector subtracted", _loss_with(sign=-1.0), "subtracted"),
        Mistake("steers the next block", _loss_with(shift=1), "steering block"),
        Mistake("the hook left registered", _loss_with(keep_hook=True), "still had a hook"),
        Mistake("a float, not a tensor", _loss_with(as_float=True), "0-d tensor"),
        Mistake("a hook that adds the vector to the block's output as it is", _loss_with(tensor_hook=True),
                _TENSOR_HOOK_REJECTION[0], stage=_TENSOR_HOOK_REJECTION[1],
                note="right under 5.x, whose blocks return tensors; 4.x's return tuples"),
        Mistake("the cross-entropy on the model's logits", _loss_with(logits_dtype="model"), "Convert the logits",
                note="right on a float32 model; a bf16 model's logits give a bf16 loss",
                stage="on a bf16 model too: a float32 loss from float32 logits"),
        Mistake("bf16 cross-entropy, cast afterwards", _loss_with(logits_dtype="cast after"), "float32 (.float())",
                stage="on a bf16 model too: a float32 loss from float32 logits"),
    )


CATALOGUE = [
    Entry("prompts", "test_contrastive_prompts", _prompt_mistakes(),
          (Variant("article by regex", prompts_regex), Variant("explicit loop", prompts_loop),
           Variant("string.Template", prompts_template))),
    Entry("prompts", "test_split_questions", _split_mistakes(),
          (Variant("itertools.islice", split_islice), Variant("by index", split_by_index),
           Variant("numpy.array_split", split_numpy), Variant("star-unpacking", split_unpack))),
    Entry("judge", "test_logprob_score", _score_mistakes(),
          (Variant("a dict of numbers", score_dict), Variant("numpy", score_numpy),
           Variant("logsumexp", score_logsumexp), Variant("re.ASCII and numpy float64", score_regex_float64))),
    Entry("judge", "test_judge_0_100", _judge_mistakes(),
          (Variant("getattr and a seed", _bind_logprob_score(judge_dict_tokens)),
           Variant("its own weighted mean", judge_own_mean),
           Variant("a request dict", _bind_logprob_score(judge_kwargs)))),
    Entry("filter", "test_effective_pairs", _pairs_mistakes(),
          (Variant("numpy with NaN", pairs_numpy), Variant("all() per row", pairs_all),
           Variant("torch with NaN", pairs_torch_nan))),
    Entry("averages", "test_three_averages", _averages_mistakes(),
          (Variant("left-padded batch with masks", averages_batched), Variant("numpy means", averages_numpy),
           Variant("model.model and a context manager", averages_model_model))),
    Entry("averages", "test_trait_vector", _vector_mistakes(),
          (Variant("einops", vector_einops), Variant("numpy", vector_numpy), Variant("torch.sub", vector_sub))),
    Entry("layer sweep", "test_spread_scaled_vectors", _spread_mistakes(),
          (Variant("numpy ddof=1", spread_numpy), Variant("std by hand", spread_manual),
           Variant("statistics.stdev", spread_statistics))),
    Entry("layer sweep", "test_layer_sweep", _sweep_mistakes(),
          (Variant("one question at a time", sweep_one_by_one), Variant("its own hook", sweep_own_hook),
           Variant("utils.steering.intervene", sweep_intervene))),
    Entry("positions", "test_steer_positions", _positions_mistakes(),
          (Variant("torch.where", positions_where), Variant("match and slices", positions_slices),
           Variant("a weight per position", positions_scale))),
    Entry("monitoring", "test_monitoring_correlations", _monitor_mistakes(),
          (Variant("scipy.stats.pearsonr", monitor_scipy), Variant("numpy.corrcoef", monitor_corrcoef),
           Variant("statistics.correlation", monitor_statistics))),
    Entry("geometry", "test_cosine_matrix", _cosine_mistakes(),
          (Variant("F.normalize and einsum", cosines_normalize), Variant("pairwise cosine_similarity", cosines_pairwise),
           Variant("numpy", cosines_numpy))),
    Entry("geometry", "test_cosine_with_axis", _axis_mistakes(),
          (Variant("F.cosine_similarity", axis_cosine_similarity), Variant("numpy", axis_numpy),
           Variant("dot of unit vectors", axis_unit_dot), Variant("numpy float64 results", axis_float64))),
    Entry("screening", "test_projection_differences", _delta_mistakes(),
          (Variant("einsum", delta_einsum), Variant("numpy", delta_numpy), Variant("a loop", delta_loop))),
    Entry("preventative", "test_preventative_loss", _loss_mistakes(),
          (Variant("ignore_index=-100", loss_ignore_index), Variant("transformers' labels=", loss_hf_labels),
           Variant("log_softmax and gather", loss_log_softmax))),
]
