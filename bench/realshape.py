"""A Qwen2.5-0.5B-shaped DAPO run built from nothing: tokenizer, model and dataset made here, no hub.

    python bench/realshape.py --out /tmp/rs --smoke                  # tiny body, real vocabulary: ~1 min
    python bench/realshape.py --out /tmp/rs05 --steps 2              # the real shape: many minutes, ~13 GiB
    python bench/realshape.py --out /tmp/rs05 --dtype bfloat16 --ranks 2 --fsdp -- optim.lr=1e-6

Real users start from Qwen2.5-0.5B(-Instruct). This script gives the trainer the same shapes, so its
memory and time can be measured on any machine:

* ``build_tokenizer``: a byte-level BPE (Qwen2's pre-tokenizer split: digits one by one) trained here on a
  generated math corpus, with Qwen's special tokens at Qwen's ids (``<|endoftext|>`` 151643,
  ``<|im_start|>`` 151644, ``<|im_end|>`` 151645) and a ChatML chat template. Its BPE vocabulary is a few
  thousand tokens; the model keeps Qwen's 151,936 rows, as Qwen2.5's embedding is larger than its
  tokenizer (151,665 tokens). A random model samples mostly ids the tokenizer does not know, which
  decode to nothing: its responses read as near-empty, and every one is wrong.
* ``build_model``: a randomly initialised ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's config (``QWEN25_05B``),
  saved in bf16 safetensors as the published checkpoint is, with Qwen2.5-Instruct's generation config.
  ``shape="smoke"`` is the same code at 2 layers x 64 (the vocabulary stays 151,936) for tests.
* ``build_dataset``: a Parquet file in the DAPO-Math-17k schema with generated integer-answer problems.
* ``main``: builds the three (cached), runs ``dapo train`` on them in a subprocess, and reports seconds
  per step, the peak RSS of the process tree, and what fraction of the weights the run changed.

Why the ``<|im_end|>`` row is calibrated: a random model at this vocabulary samples ``<|im_end|>`` with
probability ~1/151,936 per token, so every response runs to ``rollout.max_new_tokens``: with overlong
filtering every response is masked out, and without it every reward is equal; either way nothing trains
and the run measures nothing. ``build_model`` therefore replaces that one row of the tied embedding
(``calibrate_eos_row``) so that eos is sampled at a nearly constant rate per token, for a chosen mean
length (``EOS_MEAN_LEN``). Responses then end at varied lengths, which the soft overlong penalty turns into
different rewards although every answer is wrong. The row is also the input embedding of ``<|im_end|>``
in the prompt (at the 0.5b shape it comes out at half the norm of a typical row). It is a test fixture,
not a model property: a real checkpoint needs none of it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/realshape.py` from anywhere
    sys.path.insert(0, str(ROOT))

from dapo.data.templates import DAPO_MATH_PREFIX, DAPO_MATH_SUFFIX  # noqa: E402

# --------------------------------------------------------------------------------------------------
# shapes

QWEN25_05B: dict[str, Any] = dict(
    # Qwen/Qwen2.5-0.5B(-Instruct) config.json, as published
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=24, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02, attention_dropout=0.0,
    use_sliding_window=False, sliding_window=32768, use_cache=True, bos_token_id=151643, eos_token_id=151645,
)
SMOKE = dict(QWEN25_05B, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_window_layers=2)
"""The smoke shape: Qwen2.5-0.5B's config with only the body scaled down (GQA kept: 2 KV heads for 4)."""
SHAPES = {"0.5b": QWEN25_05B, "smoke": SMOKE}

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
"""Qwen2/2.5's ids for its first three special tokens; the BPE vocabulary fills ids 0..N-1 below them."""

EOS_MEAN_LEN = 70.0
"""Mean response length (tokens, temperature 1, at most 128) the ``<|im_end|>`` row is calibrated for: with
128 new tokens and a 32-token overlong cache, about 2/3 of responses end before the penalty starts, 1/4 run
to the limit, and the rest are penalised in between, so groups of 4 have mixed rewards though all are wrong."""

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newlines, spaces
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    # ChatML as Qwen2 writes it; a conversation without a system turn gets Qwen2's default one
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# --------------------------------------------------------------------------------------------------
# problems: integer answers, a worked solution ending in "Answer: N"

_NAMES = ["Maria", "Chen", "Aisha", "Jonas", "Priya", "Tomás", "Zoë", "Kenji", "Olu", "Ingrid"]
_ITEMS = ["apples", "marbles", "books", "stamps", "pencils", "cookies", "coins", "stickers"]


def _p_linear(r: random.Random) -> tuple[str, int, str]:
    a, x, b = r.randint(2, 12), r.randint(-20, 30), r.randint(-50, 50)
    c = a * x + b
    return (f"Solve for $x$: ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {c}$.", x,
            f"Subtract {b} from both sides: ${a}x = {c - b}$. Divide by {a}: $x = {x}$.")


def _p_expr(r: random.Random) -> tuple[str, int, str]:
    a, b, c, d = (r.randint(2, 40) for _ in range(4))
    ans = a * b + c * d
    return (f"Compute $ {a} \\times {b} + {c} \\cdot {d} $.", ans,
            f"First ${a} \\times {b} = {a * b}$ and ${c} \\cdot {d} = {c * d}$, so the sum is ${ans}$.")


def _p_story(r: random.Random) -> tuple[str, int, str]:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    have, bags, per, give = r.randint(3, 60), r.randint(2, 9), r.randint(2, 12), r.randint(1, 20)
    ans = have + bags * per - give
    return (f"{n} has {have} {item}. {n} buys {bags} bags with {per} {item} in each and then gives {give} "
            f"{item} to a friend. How many {item} does {n} have now?", ans,
            f"The bags hold ${bags} \\times {per} = {bags * per}$ {item}. So {n} has "
            f"${have} + {bags * per} - {give} = {ans}$ {item}.")


def _p_geometry(r: random.Random) -> tuple[str, int, str]:
    w, h = r.randint(2, 40), r.randint(2, 40)
    if r.random() < 0.5:
        return (f"A rectangle is {w} cm long and {h} cm wide. What is its area, in cm²?", w * h,
                f"Area $= {w} \\times {h} = {w * h}$ square centimetres.")
    return (f"A rectangle has sides $a = {w}$ and $b = {h}$. Find its perimeter $P = 2(a + b)$.", 2 * (w + h),
            f"$P = 2({w} + {h}) = 2 \\cdot {w + h} = {2 * (w + h)}$.")


def _p_sum(r: random.Random) -> tuple[str, int, str]:
    n = r.randint(5, 200)
    ans = n * (n + 1) // 2
    return (f"Evaluate $\\sum_{{k=1}}^{{{n}}} k$.", ans,
            f"By the formula $\\frac{{n(n+1)}}{{2}}$ with $n = {n}$: $\\frac{{{n} \\cdot {n + 1}}}{{2}} = {ans}$.")


def _p_number(r: random.Random) -> tuple[str, int, str]:
    a, b = r.randint(20, 999), r.randint(3, 60)
    if r.random() < 0.5:
        return (f"What is the remainder when ${a}$ is divided by ${b}$?", a % b,
                f"${a} = {b} \\cdot {a // b} + {a % b}$, so the remainder is ${a % b}$.")
    g = math.gcd(a, b)
    return (f"Find $\\gcd({a}, {b})$.", g, f"By the Euclidean algorithm, $\\gcd({a}, {b}) = {g}$.")


def _p_poly(r: random.Random) -> tuple[str, int, str]:
    p, q, x = r.randint(-9, 9), r.randint(-20, 20), r.randint(-6, 9)
    ans = x * x + p * x + q
    return (f"If $f(x) = x^2 + ({p})x + ({q})$, what is $f({x})$?", ans,
            f"$f({x}) = {x * x} + ({p * x}) + ({q}) = {ans}$.")


def _p_money(r: random.Random) -> tuple[str, int, str]:
    # n a multiple of 4, so that 25%, 50% or 75% of n * price is a whole number of euros
    price, n, pct = r.randint(2, 30), r.choice([4, 8, 12, 20, 40]), r.choice([25, 50, 75])
    full = price * n
    ans = full * (100 - pct) // 100
    return (f"A café sells croissants for {price} € each. On Friday they cost {pct}% less. "
            f"How many euros do {n} croissants cost on Friday?", ans,
            f"At full price {n} cost ${full}$ €; {pct}\\% off leaves "
            f"${full} \\cdot \\frac{{{100 - pct}}}{{100}} = {ans}$ €.")


PROBLEMS: list[Callable[[random.Random], tuple[str, int, str]]] = [
    _p_linear, _p_expr, _p_story, _p_geometry, _p_sum, _p_number, _p_poly, _p_money]

# words for the prose around the problems: a BPE needs many word types to learn a few thousand merges
_NOUNS = """garden river market school village teacher student farmer baker driver library museum bridge
station mountain forest island harbour kitchen window table chair ticket bicycle basket bottle candle letter
number triangle circle square angle line point graph function sequence series equation fraction ratio
percent interval variable constant coefficient polynomial root digit remainder divisor multiple factor prime
vector matrix probability coin dice card game score team player match season festival concert painting
camera computer phone message question answer problem solution method step result reason example pattern
distance speed hour minute second day week month year morning evening weather rain snow cloud storm sea
ocean lake valley road street corner building tower castle palace temple garden orchard field meadow
""".split()
_ADJS = """small large quick slow bright dark quiet loud careful curious patient honest clever simple
difficult easy heavy light warm cold early late ancient modern green red blue yellow golden silver wooden
narrow wide deep shallow round sharp smooth rough empty full equal different positive negative even odd
whole exact final first second third last next previous common rare useful strange familiar
""".split()
_VERBS = """counted measured divided multiplied added subtracted compared checked noticed wrote drew
painted carried bought sold shared packed opened closed visited crossed climbed walked travelled waited
started finished explained proved showed found guessed chose arranged collected sorted planted watered
""".split()
_ADVS = "carefully quickly slowly quietly happily exactly nearly almost again together finally suddenly".split()
_LATEX = [r"\alpha", r"\beta", r"\theta", r"\sqrt{2}", r"\leq", r"\geq", r"\neq", r"\binom{5}{2}",
          r"\lfloor x \rfloor", r"\infty", r"\mathbb{R}", r"x^{2}", r"\left( a \right)", r"\dfrac{3}{4}"]


_SYLLABLES = "ka lo mi ra ven dor sha lin bel tor qui zan fe nu ro si mar ga hel ost ar wen tri pol cas ur".split()


def _place(r: random.Random) -> str:
    """A made-up place name of 2-4 syllables: thousands of word types, so the BPE learns subword merges."""
    return "".join(r.choice(_SYLLABLES) for _ in range(r.randint(2, 4))).capitalize()


def _prose(r: random.Random) -> str:
    """One or two plain sentences of random words in fixed frames (flavour text, not meaning)."""
    w = lambda xs: r.choice(xs)  # noqa: E731
    frames = [
        f"In {_place(r)}, {w(_NAMES)} {w(_VERBS)} a {w(_ADJS)} {w(_NOUNS)} on the way to {_place(r)}.",
        f"{w(_NAMES)} {w(_ADVS)} {w(_VERBS)} the {w(_ADJS)} {w(_NOUNS)} near the {w(_NOUNS)}.",
        f"The {w(_ADJS)} {w(_NOUNS)} and the {w(_ADJS)} {w(_NOUNS)} were {w(_ADVS)} {w(_VERBS)} by {w(_NAMES)}.",
        f"Recall that ${w(_LATEX)}$ appears in many a {w(_NOUNS)}, so we {w(_ADVS)} check each {w(_NOUNS)}.",
        f"Every {w(_NOUNS)} in the {w(_NOUNS)} is {w(_ADJS)}; {w(_NAMES)} {w(_VERBS)} {r.randint(2, 99)} of them.",
    ]
    return " ".join(r.sample(frames, r.randint(1, 2)))


def make_problem(r: random.Random) -> tuple[str, int, str]:
    """(problem text, integer answer, worked solution) from one of ``PROBLEMS``."""
    return r.choice(PROBLEMS)(r)


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Tokenizer training text: DAPO-instructed problems, worked solutions with ``Answer: N`` lines, LaTeX,
    a little non-ASCII (é, ö, €, ², ×, π), and the odd plain arithmetic drill."""
    r = random.Random(f"{seed}/corpus")
    docs = []
    for i in range(n_docs):
        problem, ans, sol = make_problem(r)
        text = DAPO_MATH_PREFIX + problem + DAPO_MATH_SUFFIX if r.random() < 0.5 else f"{_prose(r)} {problem}"
        aside = f" {_prose(r)} Note that $\\pi \\approx 3.14159$ is not needed." if i % 3 == 0 else ""
        docs.append(f"{text}\n\n{sol}{aside}\n\nAnswer: {ans}\n")
        if i % 5 == 0:
            a, b = r.randint(0, 99999), r.randint(0, 9999)
            docs.append(f"{a} + {b} = {a + b}\n{a} × {b} = {a * b}\n{a} − {b} = {a - b}\n")
    return docs


# --------------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(out_dir: str | Path, vocab_size: int = 4096, n_docs: int = 12000, seed: int = 0) -> Any:
    """Train a byte-level BPE on ``make_corpus(n_docs)`` and save it as a transformers tokenizer.

    vocab_size: BPE tokens (ids 0..vocab_size-1, the 256 bytes included); the three special tokens sit at
    Qwen's ids (``SPECIAL_IDS``), above them. eos = ``<|im_end|>``, pad = ``<|endoftext|>``, no bos (as
    Qwen2.5-Instruct). Returns the loaded ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    assert 256 < vocab_size < min(SPECIAL_IDS.values()), vocab_size
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    bpe.train_from_iterator(make_corpus(n_docs, seed), trainer)
    # the special tokens enter the model vocabulary at Qwen's ids, then are declared special at those ids
    # (added tokens alone would be renumbered to follow the BPE vocabulary when the file is loaded)
    spec = json.loads(bpe.to_str())
    spec["model"]["vocab"].update(SPECIAL_IDS)
    spec["added_tokens"] = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                 special=True) for t, i in SPECIAL_IDS.items()]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=IM_END, pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE, model_max_length=131072,
        clean_up_tokenization_spaces=False, padding_side="left",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return tok


# --------------------------------------------------------------------------------------------------
# model


def _response_hidden(model: Any, prompt_ids: Sequence[Sequence[int]], n_new: int, seed: int) -> Any:
    """(P * 2, n_new, H) final hidden states at the positions that predict the tokens of 2 responses per
    prompt, sampled from the model itself (temperature 1, never stopping), as the rollout will sample them.

    Sampled, not uniform random ids: a random deep model's logits share a component (see
    ``calibrate_eos_row``) that favours some tokens at every position, and those tokens feed back."""
    import torch

    from dapo.rollout.base import SamplingParams
    from dapo.rollout.hf import HFEngine

    engine = HFEngine(model, SPECIAL_IDS[ENDOFTEXT], eos_token_ids=())
    seeds = [seed + i for i in range(len(prompt_ids))]
    comps = engine.generate(prompt_ids, SamplingParams(n=2, max_new_tokens=n_new), seeds)
    out = []
    for c in comps:
        p = list(prompt_ids[c.prompt_index])
        ids = torch.tensor([*p, *c.token_ids])[None]
        out.append(model.model(input_ids=ids).last_hidden_state[0, len(p) - 1 : -1].float())
    return torch.stack(out)


def _expected_length(eos_logit: Any, log_rest: Any) -> float:
    """E[min(L, T)] for responses ending at step t with p_t = softmax's eos share, (P, T) logits in."""
    import torch

    hazard = torch.sigmoid(eos_logit - log_rest)  # (P, T) p(eos | not ended before)
    alive = torch.cumprod(1 - hazard, dim=1)  # (P, T) P(L > t + 1)
    return float((1 + alive[:, :-1].sum(dim=1)).mean())  # sum over t of P(L > t), P(L > 0) = 1


def calibrate_eos_row(model: Any, eos_id: int, prompt_ids: Sequence[Sequence[int]], mean_len: float,
                      max_new_tokens: int = 128, seed: int = 0) -> dict[str, float]:
    """Set the ``eos_id`` row of the tied embedding so that sampled responses (temperature 1, at most
    ``max_new_tokens``) are about ``mean_len`` tokens long on average; returns what it measured.

    A random deep transformer's final hidden states share one dominant direction u (measured here: at the
    0.5b shape their projection on u is ~24 +- 0.8 of a norm ~30). The row becomes c * u, so the eos logit
    is about c * (h . u) at every position while the other 151,935 logits stay ~0.6 wide around 0: eos is
    sampled at a nearly constant rate per token. The expected length under that rate is computed from the
    hidden states of responses sampled from the model (``_response_hidden``), and c is found by bisection on
    it, without more sampling. The row is also the input embedding of <|im_end|> in the prompt: at the 0.5b
    shape it comes out at half the typical row norm (checked: it moves h . u by < 1%); at the smoke shape
    (weak shared direction) it is ~18x the typical norm. Measured for a target of 70 (temperature 1, 128
    new tokens): smoke 68 over 64 samples; 0.5b 107, 112 and 47 over three draws of 8 (pooled 89): the
    rate varies between prompts, so a few samples say little.
    """
    import torch

    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        typical = float(emb.float().norm(dim=1).median())
        h = _response_hidden(model, prompt_ids, max_new_tokens, seed)  # (R, T, H)
        u = h.mean(dim=(0, 1))
        u = u / u.norm()
        z = h @ u  # (R, T) projection on the shared direction
        logits = h @ emb.float().t()  # (R, T, V): 8 x 128 x 151,936 floats = 620 MB
        logits[..., eos_id] = float("-inf")
        log_rest = torch.logsumexp(logits, dim=-1)  # (R, T) log-partition of every other token
        del logits
        lo, hi = 0.0, 60.0 / max(float(z.mean()), 1e-3)  # at c = hi, eos is ~e^48 likelier than the rest
        for _ in range(50):
            c = (lo + hi) / 2
            lo, hi = (c, hi) if _expected_length(c * z, log_rest) > mean_len else (lo, c)
        emb[eos_id] = (c * u).to(emb.dtype)
    return {"row_norm": c, "typical_row_norm": typical, "proj_mean": float(z.mean()), "proj_std": float(z.std()),
            "log_rest_mean": float(log_rest.mean()), "predicted_len": _expected_length(c * z, log_rest)}


def build_model(out_dir: str | Path, shape: str = "0.5b", seed: int = 0, eos_mean_len: float | None = EOS_MEAN_LEN,
                tokenizer: Any = None, dtype: str = "bfloat16", max_new_tokens: int = 128) -> Path:
    """A random ``Qwen2ForCausalLM`` of ``SHAPES[shape]`` saved (safetensors) to ``out_dir``, with the
    tokenizer (``tokenizer`` or a fresh ``build_tokenizer``) and Qwen2.5-Instruct's generation config
    (eos ``<|im_end|>`` or ``<|endoftext|>``, pad ``<|endoftext|>``).

    eos_mean_len: mean response length (tokens, at temperature 1, capped at ``max_new_tokens``) that the
    ``<|im_end|>`` row is calibrated for (``calibrate_eos_row``; the module docstring says why); None
    leaves the initialisation alone. What the calibration measured goes to ``out_dir/realshape.json``.
    dtype: of the saved weights (the published checkpoint is bf16; training loads them in ``model.dtype``).
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: valid shapes are {', '.join(SHAPES)}")
    tok = tokenizer if tokenizer is not None else build_tokenizer(out_dir)
    cfg = Qwen2Config(**SHAPES[shape])  # no pad_token_id, as Qwen2.5's own: no zeroed padding_idx row
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)  # fp32 init (initializer_range 0.02)
    model = model.to(getattr(torch, dtype)).float()  # the weights as they will be saved
    info: dict[str, Any] = {"shape": shape, "seed": seed, "eos_mean_len": eos_mean_len,
                            "max_new_tokens": max_new_tokens}
    if eos_mean_len is not None:
        r = random.Random(f"{seed}/calibration")
        prompts = [chat_prompt_ids(tok, DAPO_MATH_PREFIX + make_problem(r)[0] + DAPO_MATH_SUFFIX) for _ in range(4)]
        info.update(calibrate_eos_row(model, SPECIAL_IDS[IM_END], prompts, eos_mean_len, max_new_tokens, seed=seed))
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_IDS[ENDOFTEXT], eos_token_id=[SPECIAL_IDS[IM_END], SPECIAL_IDS[ENDOFTEXT]],
        pad_token_id=SPECIAL_IDS[ENDOFTEXT])
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "realshape.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return out


def chat_prompt_ids(tokenizer: Any, content: str) -> list[int]:
    """Token ids of one user turn through the chat template, with the generation prompt (as dapo_math+chat)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_lengths(model_dir: str | Path, prompts: Sequence[str], n: int = 4, max_new_tokens: int = 128,
                     seed: int = 0) -> dict[str, float]:
    """Sample ``n`` responses per prompt (chat template, temperature 1) with dapo's own engine, as the
    trainer does: their mean length, the fraction that ended before ``max_new_tokens``, and the lengths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dapo.rollout.base import SamplingParams
    from dapo.rollout.hf import HFEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    engine = HFEngine(model, tok.pad_token_id, model.generation_config.eos_token_id)
    comps = engine.generate(ids, SamplingParams(n=n, max_new_tokens=max_new_tokens), list(range(seed, seed + len(ids))))
    lens = [len(c.token_ids) for c in comps]
    return {"len_mean": sum(lens) / len(lens), "ended": sum(c.finish_reason == "stop" for c in comps) / len(comps),
            "lengths": lens}


# --------------------------------------------------------------------------------------------------
# dataset


def build_dataset(path: str | Path, n: int = 256, seed: int = 0) -> Path:
    """``n`` generated problems as Parquet in the DAPO-Math-17k schema (the instruction already in the
    prompt, as published); ``extra_info.index`` is a seeded UUID string, as there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    r = random.Random(f"{seed}/dataset")
    rows = []
    for _ in range(n):
        problem, ans, _ = make_problem(r)
        rows.append({
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_MATH_PREFIX + problem + DAPO_MATH_SUFFIX}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(ans), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": str(uuid.UUID(int=r.getrandbits(128), version=4))},
        })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------------------------------
# the run: inputs cached in one directory, `dapo train` in a subprocess, memory polled from outside


def build_inputs(out: str | Path, shape: str, seed: int = 0, n_data: int = 256,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """``out/tokenizer``, ``out/model`` and ``out/train.parquet``, each built unless already there; returns
    their paths, the seconds each build took (0 when cached) and the model's calibration record."""
    out = Path(out)
    tok_dir, model_dir, data = out / "tokenizer", out / "model", out / "train.parquet"
    built: dict[str, float] = {}
    record = model_dir / "realshape.json"
    if record.exists():
        info = json.loads(record.read_text(encoding="utf-8"))
        if info.get("shape") != shape or info.get("seed") != seed:
            raise SystemExit(f"{model_dir} holds a {info.get('shape')!r} model (seed {info.get('seed')}), "
                             f"not {shape!r} "
                             f"(seed {seed}): use another --out for this shape")
    t = time.perf_counter()
    if not (tok_dir / "tokenizer.json").exists():
        log(f"building the tokenizer in {tok_dir}")
        build_tokenizer(tok_dir, seed=seed)
    built["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if not (record.exists() and any(model_dir.glob("*.safetensors"))):
        from transformers import AutoTokenizer

        log(f"building the {shape} model in {model_dir} (a 0.5b build samples 8 x 128 tokens: minutes)")
        build_model(model_dir, shape, seed=seed, tokenizer=AutoTokenizer.from_pretrained(tok_dir))
    built["model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if not data.exists():
        build_dataset(data, n=n_data, seed=seed)
    built["dataset_s"] = time.perf_counter() - t
    return {"model": model_dir, "data": data, "build_s": built,
            "calibration": json.loads(record.read_text(encoding="utf-8"))}


def train_args(model: Path, data: Path, run_dir: Path, steps: int, ranks: int, fsdp: bool, dtype: str,
               mini_batch: int, extra: Sequence[str] = ()) -> list[str]:
    """``dapo train`` arguments for the real-shape run; ``extra`` key=value overrides come last and win."""
    args = [
        "--model", str(model), "--data", str(data), "--reward", "math", "data.template=dapo_math+chat",
        "rollout.group_size=4", "optim.train_batch_size=4", f"optim.mini_batch_size={mini_batch}",
        "rollout.max_new_tokens=128", "algo.overlong_cache_len=32", "algo.dynamic_sampling=false",
        f"optim.steps={steps}", "eval.size=8", f"model.dtype={dtype}", f"dist.trainer_ranks={ranks}",
        "log.progress=plain", "log.tensorboard=false", f"log.out_dir={run_dir.parent}", f"log.run_name={run_dir.name}",
    ]
    if fsdp:
        args.append("dist.fsdp=true")
    return args + list(extra)


class TreeMemory:
    """Polls a process and all its descendants every ``every_s`` seconds in a thread; keeps the peak of the
    summed RSS (shared pages, e.g. torch's libraries, counted once per process that maps them) and of the
    summed PSS (shared pages split between those processes: the honest total once Ray runs several)."""

    def __init__(self, pid: int, every_s: float = 0.5):
        import psutil

        self.root, self.every_s = psutil.Process(pid), every_s
        self.peak_rss = self.peak_pss = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = pss = n = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                mem = p.memory_full_info()  # rss and pss (reads /proc/PID/smaps_rollup)
            except psutil.Error:  # gone between listing and reading
                continue
            rss, pss, n = rss + mem.rss, pss + getattr(mem, "pss", mem.rss), n + 1
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.max_procs = max(self.max_procs, n)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def step_times(run_dir: Path) -> list[dict[str, float]]:
    """Per step: seconds for the step, generation, old log-probs and update, and the rollout's lengths."""
    keys = ("time/step", "time/gen", "time/old_logp", "time/update", "response/len_mean", "response/truncated_frac",
            "batch/mixed_frac", "actor/updates")
    rows = []
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else []):
        m = json.loads(line)
        rows.append({"step": m["step"], **{k: m[k] for k in keys if k in m}})
    return rows


def _tensor_files(d: Path) -> dict[str, Path]:
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            names.update({k: f for k in s.keys()})
    return names


def weight_change(initial: Path, final: Path) -> dict[str, Any]:
    """Fraction of parameters that differ between two safetensors checkpoints, per tensor and overall.

    The initial weights are cast to the final ones' dtype first, so a bf16 run is not counted as changing
    everything by rounding an fp32 file. One tensor in memory at a time (the 0.5b embedding is 545 MB)."""
    from safetensors import safe_open

    a, b = _tensor_files(initial), _tensor_files(final)
    per: dict[str, float] = {}
    changed = total = 0
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            y = fb.get_tensor(name)
            x = fa.get_tensor(name).to(y.dtype)
        n = int((x != y).sum())
        per[name] = n / y.numel()
        changed, total = changed + n, total + y.numel()
    return {"overall": changed / max(total, 1), "params": total, "per_tensor": per,
            "unchanged_tensors": sorted(k for k, v in per.items() if v == 0.0),
            "only_initial": sorted(set(a) - set(b)), "only_final": sorted(set(b) - set(a))}


def adapter_change(final: Path) -> dict[str, Any]:
    """A LoRA checkpoint's weights against their start: B starts at zero (the adapted model starts as the
    base), so the share of B's entries that are non-zero is the share the run moved; A starts random and
    is not compared. ``params`` counts every adapter parameter."""
    from safetensors import safe_open

    per: dict[str, float] = {}
    moved = total_b = params = 0
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            params += t.numel()
            if "lora_B" in name:
                n = int((t != 0).sum())
                per[name] = n / t.numel()
                moved, total_b = moved + n, total_b + t.numel()
    return {"overall": moved / max(total_b, 1), "params": params, "per_tensor": per,
            "unchanged_tensors": sorted(k for k, v in per.items() if v == 0.0)}


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file()) / 2**20


def run(out: str | Path, smoke: bool = False, steps: int = 2, ranks: int = 1, fsdp: bool = False,
        dtype: str = "float32", mini_batch: int = 2, extra: Sequence[str] = (), poll_s: float = 0.5,
        log: Callable[[str], None] = print, omp_passive: bool = False) -> dict[str, Any]:
    """Build (or reuse) the inputs in ``out``, run ``dapo train`` on them, and measure it; returns the result
    line (also what ``main`` prints as JSON)."""
    shape = "smoke" if smoke else "0.5b"
    out = Path(out).resolve()
    inputs = build_inputs(out, shape, log=log)
    name = f"{shape}-{dtype}-r{ranks}{'-fsdp' if fsdp else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", "dapo.cli", "train",
           *train_args(inputs["model"], inputs["data"], run_dir, steps, ranks, fsdp, dtype, mini_batch, extra)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # this checkout's dapo
    if omp_passive:  # for a machine whose cores other busy processes share (bench/RESULTS.md, "Two facts")
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    log("$ " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(out))
    with TreeMemory(proc.pid, poll_s) as mem:
        rc = proc.wait()
    wall = time.perf_counter() - t0
    steps_m = step_times(run_dir)
    final = run_dir / f"step_{steps_m[-1]['step']}" if steps_m else None
    change = None
    if final is not None and (final / "adapter_model.safetensors").exists():
        change = adapter_change(final)
    elif final is not None and final.exists():
        change = weight_change(inputs["model"], final)
    mean = lambda k: (sum(r[k] for r in steps_m if k in r) / max(1, sum(k in r for r in steps_m)))  # noqa: E731
    return {
        "shape": shape, "dtype": dtype, "ranks": ranks, "fsdp": fsdp, "steps": len(steps_m), "rc": rc,
        "wall_s": wall, "peak_rss_gib": mem.peak_rss / 2**30, "peak_pss_gib": mem.peak_pss / 2**30,
        "max_procs": mem.max_procs, "s_per_step": mean("time/step"), "gen_s": mean("time/gen"),
        "old_logp_s": mean("time/old_logp"), "update_s": mean("time/update"), "len_mean": mean("response/len_mean"),
        "truncated_frac": mean("response/truncated_frac"), "mixed_frac": mean("batch/mixed_frac"),
        "weights_changed": None if change is None else change["overall"],
        "unchanged_tensors": None if change is None else len(change["unchanged_tensors"]),
        "params": None if change is None else change["params"],
        "lora": final is not None and (final / "adapter_model.safetensors").exists(),
        "ckpt_mb": None if final is None or not final.exists() else _dir_mb(final),
        "build_s": inputs["build_s"], "eos_calibration": inputs["calibration"], "per_step": steps_m,
        "run_dir": str(run_dir), "extra": list(extra),
        "per_tensor_changed": None if change is None else change["per_tensor"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the model, tokenizer, data and runs (reused)")
    p.add_argument("--smoke", action="store_true", help="2 layers x 64 (real vocabulary): the harness in a minute")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ranks", type=int, default=1, choices=(1, 2), help="dist.trainer_ranks (2 starts Ray)")
    p.add_argument("--fsdp", action="store_true", help="dist.fsdp=true (with --ranks 2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model.dtype")
    p.add_argument("--mini-batch", type=int, default=2, choices=(1, 2, 4),
                   help="optim.mini_batch_size in prompts (of 4): optimiser steps per rollout = 4 / this")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for the run: for a machine other busy processes share; on an idle one "
                        "it costs every parallel op a thread wake-up (default: the environment's policy, as dapo train)")
    a = p.parse_args(argv)
    res = run(a.out, a.smoke, a.steps, a.ranks, a.fsdp, a.dtype, a.mini_batch, extra, omp_passive=a.omp_passive)
    nan = float("nan")
    for r in res["per_step"]:
        g = lambda k: r.get(k, nan)  # noqa: E731
        print(f"step {r['step']}: {g('time/step'):.1f} s (gen {g('time/gen'):.1f}, old_logp {g('time/old_logp'):.1f}, "
              f"update {g('time/update'):.1f}); len {g('response/len_mean'):.1f}, "
              f"truncated {g('response/truncated_frac'):.2f}")
    print(f"peak memory of the process tree ({res['max_procs']} processes at most): RSS {res['peak_rss_gib']:.2f} GiB, "
          f"PSS {res['peak_pss_gib']:.2f} GiB")
    if res["weights_changed"] is not None:
        least = sorted(res["per_tensor_changed"].items(), key=lambda kv: kv[1])[:4]
        what = "LoRA B entries moved off zero" if res["lora"] else "weights changed"
        print(f"{what}: {res['weights_changed']:.1%} (of {res['params']:,} trained parameters); "
              f"{res['unchanged_tensors']} tensors unchanged; least changed: "
              + ", ".join(f"{k} {v:.1%}" for k, v in least))
    if res["ckpt_mb"] is not None:
        print(f"last checkpoint: {res['ckpt_mb']:.0f} MiB")
    line = {k: v for k, v in res.items() if k != "per_tensor_changed"}
    from common import emit_json, machine  # noqa: E402  (bench/common.py; this directory is on sys.path)

    emit_json({"bench": "realshape", "machine": machine(), **line})
    return 0 if res["rc"] == 0 and res["weights_changed"] else 1


if __name__ == "__main__":
    sys.exit(main())
