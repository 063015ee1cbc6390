"""Shared fixtures: a tiny real Qwen2 model with the project's character tokenizer, saved in HF format."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def build_random_tiny(path, seed=0, hidden=64, layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dapo.data.charvocab import make_char_tokenizer

    tok = make_char_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def one_thread():
    """Runs in this process single-threaded: float rounding that repeats bit for bit (as the one-thread
    subprocesses of tests/faults do), and a shared 2-core machine not oversubscribed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    build_random_tiny(path)
    return path


# settings that make a run take seconds: G=4, 4 prompts, 8 new tokens
TINY_RUN = [
    "rollout.group_size=4", "optim.train_batch_size=4", "optim.mini_batch_size=2", "optim.micro_batch_size=5",
    "rollout.max_new_tokens=8", "algo.overlong_cache_len=2", "eval.size=8", "log.progress=plain",
    "algo.max_gen_rounds=2", "log.tensorboard=false",
]


TOOL_TASK = {
    "tools.py": "def add(a, b):\n    return a + b\n",
    "reward.py": "def score(response, ground_truth):\n    return 1.0 if response.strip() == ground_truth else -1.0\n",
}
"""A tool task's files: one tool, and a reward on the last turn's text (exact match)."""
TOOL_TURNS = "<tool>add(1, 2)</tool><eos><result>3</result>\n{}<eos>"
"""A call, its result and an answer (formatted in)."""


def build_tool_caller(path, answers=("3", "4")):
    """A tiny model overfit on "a+b=" followed by TOOL_TURNS (a call, its result, an answer), saved to ``path``:
    under ``--tools`` (TOOL_TASK's add) it calls the tool, reads the result and answers. With several ``answers``
    every batch holds each equally often, so the model learns to pick among them uniformly: a group of samples then
    holds different answers by construction (with two and G=4, all four agree 1 time in 8), not by rounding luck.
    Built single-threaded, so the weights are the same whichever test builds it first; the learning rate decays
    to 0 over the 100 steps (a constant 2e-2 for longer diverged, 60 steps left some seeds rarely calling the tool:
    over 6 seeds this one called it in 121-127 of 128 samples, with 78-97% of groups mixed)."""
    model, tok = build_random_tiny(path, seed=1)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = 100
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
        for _ in range(steps):
            pairs = torch.randint(10, 99, (8, 2)).tolist()
            ids = torch.tensor([tok(f"{a}+{b}=" + TOOL_TURNS.format(answers[i % len(answers)]))["input_ids"]
                                for i, (a, b) in enumerate(pairs)])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tool_task(tmp_path_factory):
    """A directory with the tool caller model (``model/``, answering the tool's "3" or "4" half the time each),
    TOOL_TASK's files and 40 rows ``data.jsonl`` whose answer is "3": most groups are mixed, whatever the CPU.
    ``args``: the overrides that run it (after TINY_RUN or faultkit.FAST, whose rollout settings they override), for ``load_config`` and ``dapo train`` alike."""
    import json
    from types import SimpleNamespace

    d = tmp_path_factory.mktemp("tool_task")
    build_tool_caller(d / "model")
    for name, text in TOOL_TASK.items():
        (d / name).write_text(text)
    rows = [{"prompt": f"{a}+{b}=", "answer": "3"} for a, b in zip(range(10, 50), range(40, 80))]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"model.path={d / 'model'}", f"data.path={d / 'data.jsonl'}", f"reward.fn={d / 'reward.py'}:score",
            f"env.tools={d / 'tools.py'}", "data.template=none", "rollout.max_new_tokens=40", "algo.overlong_cache_len=4",
            "rollout.max_turns=2", "env.workers=1", "eval.size=0"]
    return SimpleNamespace(dir=d, args=args)
