"""Every combination a user brings, on the defaults: bases x data formats x reward kinds (#23).

Bases: the demo base from the cache (a built-in task's warm-up), a ``dapo sft`` output (the demo base
fine-tuned on the user's own pairs), an HF directory whose tokenizer has a ChatML chat template (tiny Qwen2 +
a BPE tokenizer trained here) and one whose tokenizer has none. Data: the user's own column names in JSONL
and CSV, chat-message prompts in Parquet (the DAPO-Math-17k schema), a saved ``datasets`` directory. Rewards:
``math`` and a file function returning a float, a bool or a dict. Every one of the 64 cells runs 2 steps of
``dapo train`` with only the keys that name the user's columns and reward, and must: finish, print the
template it chose and why (the one expected for that base and reward), show the model a first prompt that
holds the row's problem, have rewards that are not all equal where the base can do the task (the two
addition bases, the three file rewards), and give in ``dapo eval`` of its last checkpoint on the same file the
held-out accuracy it reported as "after". Combinations that cannot run are refused before the first step
with a message naming the key to set. ``dapo sft`` has its own matrix (bases x pair/conversation rows x with
or without a reward).
"""
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN
from dapo.cli import main as cli_main
from dapo.config import SFTConfig
from dapo.data.example import Example
from dapo.data.tasks import get_task
from dapo.eval import headline
from dapo.problems import TEMPLATE_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

ADDITION = get_task("addition")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REWARDS_PY = '''
def _sum(response):
    return response.rsplit(":", 1)[-1].strip()

def as_float(response, ground_truth, **row):
    return 1.0 if _sum(response) == ground_truth else -1.0

def as_bool(response, ground_truth, **row):
    return _sum(response) == ground_truth

def as_dict(response, ground_truth, **row):
    ok = _sum(response) == ground_truth
    return {"score": 1.0 if ok else -1.0, "acc": ok}
'''
# cells cost seconds: G=4, 4 prompts, 2 steps, 8 held-out prompts; max_new_tokens fits the worked sums
RUN = [k for k in TINY_RUN if not k.startswith("rollout.max_new_tokens")] + [
    "rollout.max_new_tokens=16", "optim.steps=2", "ckpt.every=2", "log.report=false"]


def _problems(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, answer, worked solution) of n addition problems, the demo task's format."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = ADDITION.make_example(rng)
        out.append((ex.prompt, ex.answer, ADDITION.sft_response(Example(ex.prompt, ex.answer))))
    return out


# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The user's files: 160 addition problems in each data format, and a file of reward functions."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("user")
    rows = _problems(160, seed=1)
    jsonl = d / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"question": p, "target": a, "solution": s}) + "\n" for p, a, s in rows))
    csv = d / "mine.csv"
    csv.write_text("q,gold\n" + "".join(f"{p},{a}\n" for p, a, _ in rows))
    parquet = d / "math17k.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "mine", "prompt": [{"role": "user", "content": p}], "ability": "MATH",
         "reward_model": {"ground_truth": a, "style": "rule"}, "extra_info": {"index": str(i)}}
        for i, (p, a, _) in enumerate(rows)]), parquet)
    saved = d / "saved_dataset"
    datasets.Dataset.from_list([{"problem": p, "answer": a} for p, a, _ in rows]).save_to_disk(str(saved))
    rewards = d / "rewards.py"
    rewards.write_text(REWARDS_PY)
    pairs = d / "pairs.jsonl"  # SFT data: prompt/response only, no answer
    pairs.write_text("".join(json.dumps({"prompt": p, "response": s}) + "\n" for p, _, s in rows))
    convs = d / "convs.jsonl"  # SFT data: chat conversations
    convs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                      {"role": "assistant", "content": s}], "answer": a}) + "\n"
                             for p, a, s in rows))
    return {"jsonl": jsonl, "csv": csv, "parquet": parquet, "dataset": saved, "rewards": rewards,
            "pairs": pairs, "convs": convs}


def _bpe_dir(path: Path, chat: bool, seed: int = 0) -> Path:
    """A tiny Qwen2 with a byte-level BPE tokenizer trained on addition text (ChatML specials, eos
    <|im_end|>), with or without the ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [f"{p}{s}" for p, _, s in _problems(400, seed=9)] + ["user assistant system Solve the following math"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML if chat else None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory, files):
    from dapo.warmup.base import prepare_base_model

    root = tmp_path_factory.mktemp("bases")
    # hidden 64 (ffn 128) reached the target in 600 steps or not depending on the CPU's float rounding (sampled
    # accuracy 0.03 at step 600 on one machine, 0.2 on another; seeds 0-2 here: 1000 steps at 0.08, 950, 650).
    # Hidden 128 reached it by step 250-700 for seeds 0-5 on one thread (25-68 s).
    small = SFTConfig(layers=2, hidden=128, heads=4, ffn=256, batch=64, target_accuracy=0.2, min_steps=200,
                      eval_every=50, n_probe=64, max_steps=1000)
    demo = prepare_base_model("addition", cache_dir=root / "cache", settings=small, num_threads=1,
                              log=lambda s: None)
    warm = json.loads((demo / "sft.json").read_text())
    assert warm["sampled_accuracy"] >= 0.15, ("the demo base the cells need cannot add", warm["sampled_accuracy"])
    sft_out = root / "sft"
    assert cli_main(["sft", "--model", str(demo), "--data", str(files["jsonl"]), "--out", str(sft_out),
                     "--threads", "1", "data.prompt_key=question", "data.answer_key=target",
                     "sft.response_key=solution", "sft.target_accuracy=null", "sft.lr=1e-4", "sft.batch=32",
                     "sft.max_steps=10", "sft.min_steps=5", "sft.eval_every=5"]) == 0
    return {"demo": demo, "sft": sft_out, "chat": _bpe_dir(root / "chat", chat=True),
            "plain": _bpe_dir(root / "plain", chat=False)}


# -------------------------------------------------------------------------------------------------- dapo train


DATA = {  # format -> (file key, the keys that name the user's columns)
    "jsonl": ("jsonl", ["data.prompt_key=question", "data.answer_key=target"]),
    "csv": ("csv", ["data.prompt_key=q", "data.answer_key=gold"]),
    "parquet": ("parquet", []),  # the DAPO-Math-17k schema is the default
    "dataset": ("dataset", ["data.prompt_key=problem"]),  # the answer falls back to the 'answer' column
}
REWARDS = ["math", "as_float", "as_bool", "as_dict"]
CAN_ADD = {"demo", "sft"}  # bases that can do the task


def _expected_template(base: str, reward: str) -> tuple[str, str]:
    if base in CAN_ADD:
        return "none", "auto: the template"  # what the base was trained with (prompt_template.json)
    chat = base == "chat"
    if reward == "math":
        return ("dapo_math+chat" if chat else "dapo_math"), "auto: the math reward"
    return ("chat" if chat else "none"), "auto: reward"


@pytest.mark.parametrize("reward", REWARDS)
@pytest.mark.parametrize("fmt", list(DATA))
@pytest.mark.parametrize("base", ["demo", "sft", "chat", "plain"])
def test_train_cell(base, fmt, reward, bases, files, tmp_path, capsys):
    key, keys = DATA[fmt]
    data = str(files[key])
    spec = "math" if reward == "math" else f"{files['rewards']}:{reward}"
    rc = cli_main(["train", "--model", str(bases[base]), "--data", data, "--reward", spec, *keys, *RUN,
                   f"log.out_dir={tmp_path}", "log.run_name=cell"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    template, why = _expected_template(base, reward)
    assert f"prompt template: {template} ({why}" in err, err[:3000]
    first = err.split("the first training prompt, decoded from its token ids: ")[1].splitlines()[0]
    problem = first.split("+")[0].rsplit("'", 1)[-1].split("\\n")[-1]  # the row's first operand, as the model sees it
    assert problem.isdigit() and "=" in first, first  # the problem is in what the model sees, not hidden
    if template.endswith("chat"):
        assert "<|im_start|>user" in first and first.rstrip("'").endswith("<|im_start|>assistant\\n"), first
    run = tmp_path / "cell"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    if base in CAN_ADD and reward != "math":
        assert max(m["batch/mixed_frac"] for m in steps) > 0, steps  # rewards not all equal: a gradient
    after = json.loads((run / "summary.json").read_text())["after"]["accuracy"]
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--model", str(run / "step_2"), "--data", data, "--progress", "none", "--no-samples",
                     "--out", str(out)]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["settings"]["held_out"] and result["settings"]["template"] == template
    assert headline(result)["accuracy"] == after, (result["metrics"], after)


# -------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("args,names", [
    (["--data", "pairs", "--reward", "as_float"], "data.answer_key"),  # no ground truth to reward against
    (["--data", "jsonl", "--reward", "as_float"], "data.prompt_key"),  # own column names, not given
    (["--data", "jsonl", "--reward", "nope", "data.prompt_key=question", "data.answer_key=target"], "nope"),
    (["--data", "csv", "--reward", "as_float", "data.prompt_key=question"], "data.prompt_key"),
])
def test_a_cell_that_cannot_run_is_refused_before_the_first_step(args, names, bases, files, tmp_path, capsys):
    args = [files[a] if a in files and i and args[i - 1] == "--data" else a for i, a in enumerate(args)]
    args = [f"{files['rewards']}:{a}" if i and args[i - 1] == "--reward" else str(a) for i, a in enumerate(args)]
    rc = cli_main(["train", "--model", str(bases["demo"]), *args, *RUN, f"log.out_dir={tmp_path}",
                   "log.run_name=refused"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert names in err.split("error: ", 1)[1], err
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()


# -------------------------------------------------------------------------------------------------- dapo sft


SFT_RUN = ["--threads", "1", "sft.max_steps=6", "sft.min_steps=2", "sft.eval_every=2", "sft.batch=16",
           "sft.layers=1", "sft.hidden=32", "sft.heads=2", "sft.ffn=64"]


@pytest.mark.parametrize("graded", [False, True])
@pytest.mark.parametrize("rows", ["pairs", "convs"])
@pytest.mark.parametrize("base", ["new", "demo", "chat", "plain"])
def test_sft_cell(base, rows, graded, bases, files, tmp_path, capsys):
    """Pairs without answers and conversations (with an answer column), with no reward or a file reward:
    the warm-up runs, says what stops it, and records the template that dapo train on its output keeps."""
    out = tmp_path / "out"
    model = [] if base == "new" else ["--model", str(bases[base])]
    reward = ["--reward", f"{files['rewards']}:as_float"] if graded else []
    rc = cli_main(["sft", *model, "--data", str(files[rows]), "--out", str(out), *reward, *SFT_RUN,
                   "sft.target_accuracy=0.99", "sft.lr=1e-4" if base != "new" else "sft.lr=3e-3"])
    err = capsys.readouterr()
    err = err.out + err.err
    if graded and rows == "pairs":  # a reward needs the ground truth the pairs do not have
        assert rc == 0 and "stopping rule: the held-out rows have no answer" in err, err[-2000:]
    elif rows == "convs" and not graded:  # answers, no reward: the math verifier fails the rows' own responses
        assert rc == 2 and "none of the 16 held-out rows' own responses scores as correct under reward.fn=auto" in err
        assert "Traceback" not in err and not out.exists(), err[-2000:]
        return
    else:
        assert rc == 0 and "Traceback" not in err, err[-2000:]
    if rows == "convs":
        assert "stopping rule: held-out sampled accuracy" in err
    chat = base == "chat"
    recorded = json.loads((out / TEMPLATE_FILE).read_text())["template"]
    if base == "demo":
        assert recorded == "none"  # the base's own
    elif graded or rows == "convs":
        assert recorded in (("chat", "dapo_math+chat") if chat else ("none", "dapo_math"))
    else:
        assert recorded == ("chat" if chat else "none")
    info = json.loads((out / "sft.json").read_text())
    assert info["stopped"] in ("max_steps", "loss_plateau", "target") and info["steps"] <= 6


def test_sft_on_conversations_trains_on_what_dapo_train_then_renders(bases, files):
    """With a chat template: the pair a conversation row gives is (the prompt ids dapo train encodes for that
    row, the assistant's content and the template's <|im_end|>); earlier assistant turns give pairs of their own."""
    from dapo.config import load_config
    from dapo.model import load_tokenizer
    from dapo.problems import load_problems
    from dapo.warmup.base import example_pairs

    cfg = load_config(overrides=[f"data.path={files['convs']}", f"reward.fn={files['rewards']}:as_float",
                                 f"model.path={bases['chat']}"])
    tok = load_tokenizer(cfg.model, str(bases["chat"]))
    probs = load_problems(cfg, tok, lambda s: None, require_answer=False)
    try:
        item = probs.stream.take(1)[0]
        assert probs.template == "chat"
        (prompt, response), = example_pairs(item, probs.template, tok, cfg)
        assert prompt == item.prompt_ids  # the very ids dapo train gives the model
        content = item.example.fields["messages"][1]["content"]
        assert tok.decode(prompt) == f"<|im_start|>user\n{item.example.prompt[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
        assert tok.decode(response) == content + "<|im_end|>" and response[-1] == tok.eos_token_id
        two = Example(item.example.prompt, None, fields={"messages": [
            {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "02:2"},
            {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "04:4"}]})
        pairs = example_pairs(type(item)(0, two, item.prompt_ids), probs.template, tok, cfg)
        assert [tok.decode(r) for _, r in pairs] == ["02:2<|im_end|>", "04:4<|im_end|>"]
        assert tok.decode(pairs[1][0]).startswith("<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n02:2")
    finally:
        probs.close()


TOOLS_CHATML = ("{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n"
                "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
                "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments | tojson }})"
                "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
"""A ChatML template that lists the tools in a system turn and writes an assistant turn's tool_calls."""


def _tool_trace(a: int, b: int, tools_as_text: bool = False) -> dict:
    """A tool-use conversation as TRL's and verl's data hold one: a call, its result, the answer; the schemas."""
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    return {"messages": [
        {"role": "user", "content": f"{a}+{b}="},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
        {"role": "tool", "name": "add", "content": str(a + b)},
        {"role": "assistant", "content": str(a + b)}], "answer": str(a + b),
        "tools": json.dumps(tools) if tools_as_text else tools}


def test_sft_on_tool_use_conversations_imitates_the_calls_and_the_answer(tmp_path, capsys):
    """dapo sft on tool-use traces (assistant turns with tool_calls and no content, tool turns, a tools column as
    a list or as JSON text): each assistant turn is a pair, the call written by the chat template, the tools
    listed where it lists them; the prompt of the first is what dapo train renders for the row. Without a chat
    template, or with a malformed tools column, the file is refused naming the row."""
    from dapo.config import load_config
    from dapo.model import load_tokenizer
    from dapo.problems import load_problems
    from dapo.warmup.base import example_pairs

    base = _bpe_dir(tmp_path / "base", chat=True)
    tok = load_tokenizer(load_config().model, str(base))
    tok.chat_template = TOOLS_CHATML
    tok.save_pretrained(base)
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(_tool_trace(a, a + 30, tools_as_text=a % 2 == 0)) + "\n" for a in range(10, 50)))
    cfg = load_config(overrides=[f"data.path={data}", f"model.path={base}", "data.template=chat"])
    tok = load_tokenizer(cfg.model, str(base))
    probs = load_problems(cfg, tok, lambda s: None, require_answer=False)
    try:
        for item in probs.stream.take(2):  # one with the tools as a list, one as JSON text
            a = int(item.example.prompt[0]["content"].split("+")[0])
            (p1, r1), (p2, r2) = example_pairs(item, probs.template, tok, cfg)
            head = f"<|im_start|>system\nadd;<|im_end|>\n<|im_start|>user\n{a}+{a + 30}=<|im_end|>\n<|im_start|>assistant\n"
            assert p1 == item.prompt_ids and tok.decode(p1) == head
            assert tok.decode(r1) == f'<tool_call>add({{"a": {a}, "b": {a + 30}}})</tool_call><|im_end|>'
            assert tok.decode(p2) == (tok.decode(p1) + tok.decode(r1) + f"\n<|im_start|>tool\n{2 * a + 30}<|im_end|>\n"
                                      "<|im_start|>assistant\n")
            assert tok.decode(r2) == f"{2 * a + 30}<|im_end|>" and r2[-1] == tok.eos_token_id
    finally:
        probs.close()
    out = tmp_path / "sft"
    assert cli_main(["sft", "--model", str(base), "--data", str(data), "--out", str(out), "data.template=chat",
                     *SFT_RUN[:6], "sft.target_accuracy=null", "sft.lr=1e-3"]) == 0
    assert json.loads((out / "sft.json").read_text())["steps"] == 6

    plain = _bpe_dir(tmp_path / "plain", chat=False)
    rc = cli_main(["sft", "--model", str(plain), "--data", str(data), "--out", str(tmp_path / "sft2"), *SFT_RUN[:6]])
    assert rc == 2 and f"{data}: an assistant turn with tool_calls and no content needs a chat template" in \
        capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**_tool_trace(a, a), **({"tools": 7} if a == 12 else {})}) + "\n"
                           for a in range(10, 30)))
    rc = cli_main(["sft", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "sft3"), *SFT_RUN[:6]])
    assert rc == 2 and (f"{bad}: row 3 (line 3): tools column must be a list of tool schemas (JSON objects), or its "
                        f"JSON text, got int") in capsys.readouterr().err


def test_the_demo_base_with_a_users_file_on_the_defaults(bases, files, tmp_path, capsys, monkeypatch):
    """The failure of #23 as a user met it: the demo base (a built-in task's, from the cache) on their own file
    with their own reward and columns, no template key."""
    rc = cli_main(["train", "--model", str(bases["demo"]), "--data", str(files["jsonl"]), "--reward",
                   f"{files['rewards']}:as_float", "data.prompt_key=question", "data.answer_key=target", *RUN,
                   f"log.out_dir={tmp_path}", "log.run_name=r"])
    err = capsys.readouterr().err
    assert rc == 0 and "unknown prompt template" not in err
    assert f"prompt template: none (auto: the template {bases['demo']} was trained with" in err
    # no --model: the demo base the run builds or finds in the cache is the model it loads, and its recorded
    # template is taken as with --model (auto picked by the reward, dapo_math, for the same base before)
    import dapo.warmup

    monkeypatch.setattr(dapo.warmup, "prepare_base_model", lambda task, log=print: bases["demo"])
    rc = cli_main(["train", "--data", str(files["jsonl"]), "data.prompt_key=question", "data.answer_key=target",
                   *RUN, "optim.steps=1", f"log.out_dir={tmp_path}", "log.run_name=implicit"])
    err = capsys.readouterr().err
    assert rc == 0 and f"prompt template: none (auto: the template {bases['demo']} was trained with" in err
    old = tmp_path / "old_base"  # a base cached before this fix recorded "task": read as none
    import shutil

    shutil.copytree(bases["demo"], old)
    (old / TEMPLATE_FILE).write_text('{"template": "task"}\n')
    from dapo.config import load_config
    from dapo.problems import choose_template

    cfg = load_config(overrides=[f"data.path={files['jsonl']}", f"model.path={old}"])
    assert choose_template(cfg, None)[0] == "none"
