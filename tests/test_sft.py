"""The supervised warm-up and the cached demo base model, on tiny settings (seconds, not minutes)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from dapo.data.charvocab import make_char_tokenizer
from dapo.data.example import Example
from dapo.data.tasks import MULTISUM_SFT_STEPS, TrainStream, get_task
from dapo.config import SFTConfig
from dapo.cpu import default_threads
from dapo.items import PromptItem
from dapo.problems import task_score_fn
from dapo.warmup import (
    IGNORE_INDEX, base_model_dir, build_tiny_model, make_probe, prepare_base_model, sft, sft_batch, sft_loss,
    task_settings,
)
from dapo.warmup.base import task_pairs
from dapo.warmup.command import main as sft_main

ADD = get_task("addition")
TINY = dict(layers=1, hidden=32, heads=2, ffn=64, max_pos=32)
TINY_SETTINGS = SFTConfig(**TINY, batch=16, max_steps=3, target_accuracy=None, n_probe=8)
THREADS = 1  # tiny models: a second thread only adds synchronisation (and spins on a busy machine)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


def _tiny_model(tok, seed=0):
    return build_tiny_model(len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, **TINY, seed=seed)


def test_build_tiny_model_default_size_and_tied(tok):
    m = build_tiny_model(len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert isinstance(m, Qwen2ForCausalLM)
    V, h, f, L = len(tok), 128, 512, 4
    # embedding (tied with the head) + per layer: q,k,v,o weights, q,k,v biases, MLP, 2 norms + final norm
    expected = V * h + L * (4 * h * h + 3 * h + 3 * h * f + 2 * h) + h
    assert sum(p.numel() for p in m.parameters()) == expected == 1_064_064
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.config.eos_token_id == tok.eos_token_id and m.config.pad_token_id == tok.pad_token_id


def test_build_tiny_model_seeded_and_leaves_global_rng(tok):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = _tiny_model(tok, 0), _tiny_model(tok, 0), _tiny_model(tok, 1)
    assert torch.rand(1) == before  # model init used a forked RNG
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def _pairs(tok, exs):
    return [(tok(e.prompt)["input_ids"], tok(ADD.sft_response(e))["input_ids"] + [tok.eos_token_id]) for e in exs]


def _probe(tok, exs, seed=0, greedy_len=None):
    items = [PromptItem(-1 - i, e, tok(e.prompt)["input_ids"]) for i, e in enumerate(exs)]
    return make_probe(items, task_score_fn(ADD), tok, seed, greedy_len or ADD.max_response_len + 1)


def _run(model, tok, probe=None, seed=0, **settings):
    return sft(model, task_pairs(ADD, tok, seed), tok.pad_token_id, SFTConfig(**settings), probe, THREADS,
               log=lambda s: None)


def test_sft_batch_labels_only_response(tok):
    exs = [Example("357+68=", "425"), Example("9+1=", "10")]
    ids, labels = sft_batch(_pairs(tok, exs), tok.pad_token_id)
    assert ids.shape == labels.shape == (2, len("357+68=15,12,04:425") + 1)
    assert tok.decode(ids[0]) == "357+68=15,12,04:425<eos>"
    assert tok.decode(ids[1]) == "9+1=10:10<eos>" + "<pad>" * 10  # right padding
    assert (labels[0, :7] == IGNORE_INDEX).all() and (labels[1, :4] == IGNORE_INDEX).all()
    assert tok.decode(labels[0, 7:]) == "15,12,04:425<eos>"
    assert tok.decode(labels[1, 4:10]) == "10:10<eos>"
    assert (labels[1, 10:] == IGNORE_INDEX).all()


def test_short_sft_lowers_loss(tok):
    fixed = sft_batch(_pairs(tok, TrainStream(ADD, seed=99).take(64)), tok.pad_token_id)
    m = _tiny_model(tok)
    with torch.no_grad():
        before = sft_loss(m, *fixed).item()
    probe = _probe(tok, TrainStream(ADD, seed=7).take(8))
    r = _run(m, tok, probe, max_steps=30, lr=3e-3, batch=32, target_accuracy=None, min_steps=0, eval_every=0)
    with torch.no_grad():
        after = sft_loss(m, *fixed).item()
    assert after < before - 1.0, (before, after)  # ln(100) ~ 4.6 at init; the format alone is learnt fast
    assert r.steps == 30 and r.stopped == "max_steps" and 0.0 <= r.sampled_accuracy <= 1.0


def test_sft_stops_on_target(tok):
    m = _tiny_model(tok)
    r = _run(m, tok, _probe(tok, TrainStream(ADD, seed=7).take(8)), max_steps=50, target_accuracy=0.0, min_steps=4,
             eval_every=2, batch=8)
    assert r.stopped == "target" and r.steps == 4 and len(r.history) == 1


def test_sft_measures_without_target_and_runs_every_step(tok):
    m = _tiny_model(tok)
    r = _run(m, tok, _probe(tok, TrainStream(ADD, seed=7).take(8)), max_steps=5, target_accuracy=None, min_steps=2,
             eval_every=2, batch=8)
    assert r.stopped == "max_steps" and r.steps == 5 and [h["step"] for h in r.history] == [2, 4]


def test_task_settings_apply_the_tasks_overrides(tmp_path):
    assert task_settings("addition") == SFTConfig()
    ms = task_settings("multisum")
    assert ms.target_accuracy is None and ms.max_steps == MULTISUM_SFT_STEPS and ms.lr == SFTConfig().lr
    assert task_settings("multisum_direct") == ms  # the control differs in its data only
    assert base_model_dir("multisum", ms, tmp_path) != base_model_dir("multisum_direct", ms, tmp_path)  # cached apart


def test_sft_main_uses_the_tasks_settings(tmp_path):
    out = tmp_path / "ms"
    sft_main(["--task", "multisum_direct", "--out", str(out), "--max-steps", "2", "--n-probe", "4", "--threads", "1"])
    meta = json.loads((out / "sft.json").read_text())
    assert meta["steps"] == 2 and meta["settings"]["target_accuracy"] is None
    assert meta["settings"]["eval_every"] == task_settings("multisum").eval_every


def test_probe_accuracy_untrained_and_reproducible(tok):
    m = _tiny_model(tok)
    exs = TrainStream(ADD, seed=5).take(16)
    assert _probe(tok, exs)(m, True) == 0.0  # an untrained model cannot add
    a = _probe(tok, exs, seed=3)(m, False)
    assert 0.0 <= a <= 1.0 and _probe(tok, exs, seed=3)(m, False) == a


def test_prepare_base_model_writes_loadable_dir_and_caches(tok, tmp_path):
    lines: list[str] = []
    kw = dict(cache_dir=tmp_path, settings=TINY_SETTINGS, num_threads=THREADS)
    path = prepare_base_model("addition", **kw, log=lines.append)
    assert path == base_model_dir("addition", TINY_SETTINGS, tmp_path) and path.parent.parent == tmp_path
    meta = json.loads((path / "sft.json").read_text())
    assert meta["steps"] == 3 and meta["seed"] == 0 and meta["task"] == "addition"
    assert {"seconds", "cpu_seconds", "sampled_accuracy", "greedy_accuracy"} <= set(meta)
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directory left behind

    model = AutoModelForCausalLM.from_pretrained(path)
    loaded_tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, Qwen2ForCausalLM) and model.config.num_hidden_layers == 1
    assert loaded_tok.decode(loaded_tok("12+3=")["input_ids"]) == "12+3="

    # the second call is a cache hit: nothing retrained, the files untouched
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert prepare_base_model("addition", **kw, log=lines.append) == path
    assert lines and "cached" in lines[0] and (path / "model.safetensors").stat().st_mtime_ns == mtime

    # other settings, another directory; force rebuilds in place, deterministically
    other = prepare_base_model("addition", cache_dir=tmp_path, log=lambda s: None, num_threads=THREADS,
                               settings=TINY_SETTINGS, seed=1)
    assert other != path
    weights = load_file(path / "model.safetensors")
    assert prepare_base_model("addition", **kw, force=True, log=lambda s: None) == path
    rebuilt = load_file(path / "model.safetensors")
    assert weights.keys() == rebuilt.keys() and all(torch.equal(weights[k], rebuilt[k]) for k in weights)


def test_prepare_base_model_never_trusts_a_partial_dir(tmp_path):
    path = base_model_dir("addition", TINY_SETTINGS, tmp_path)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{half written")  # what a killed non-atomic writer would leave
    kw = dict(cache_dir=tmp_path, settings=TINY_SETTINGS, num_threads=THREADS)
    assert prepare_base_model("addition", **kw, log=lambda s: None) == path
    assert (path / "sft.json").is_file()
    AutoModelForCausalLM.from_pretrained(path)


def test_prepare_base_model_interrupted_leaves_nothing(tmp_path):
    def kill(line: str) -> None:
        if line.startswith("sft done"):
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C at the end of training

    with pytest.raises(KeyboardInterrupt):
        prepare_base_model("addition", cache_dir=tmp_path, settings=TINY_SETTINGS, num_threads=THREADS,
                           log=kill)
    assert not base_model_dir("addition", TINY_SETTINGS, tmp_path).exists()


def test_default_threads_in_range():
    n = default_threads()
    assert isinstance(n, int) and 1 <= n <= 4


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="addition"):
        prepare_base_model("nope", cache_dir=tmp_path)


def test_sft_main_writes_out_dir(tmp_path, capsys):
    out = tmp_path / "base"
    path = sft_main(["--out", str(out), "--max-steps", "2", "--target-acc", "0", "--n-probe", "4",
                     "--threads", "1"])
    assert path == out and json.loads((out / "sft.json").read_text())["steps"] == 2
    assert str(out) in capsys.readouterr().out
