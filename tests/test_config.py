"""Config: presets, YAML and key=value overrides, and errors that name the key."""
import pytest

from dapo.config import (
    PRESET_DOCS,
    ABLATION_ROWS,
    PRESETS,
    Config,
    ConfigError,
    config_from_dict,
    describe,
    load_config,
    save_config,
)


def _clip_grads(cfg):
    """d loss / d logp of one token per ratio, under ``cfg``'s loss as the learner resolves it (``LossSpec``)."""
    import torch

    from dapo.learner.loss import LossSpec

    spec = LossSpec.of(cfg)
    ratios = torch.tensor([[0.7, 0.85, 1.1, 1.25, 1.35]])
    out = {}
    for sign in (1.0, -1.0):
        logp = ratios.log().clone().requires_grad_(True)
        loss, _ = spec.policy_loss(logp, torch.zeros_like(logp), torch.tensor([sign]), torch.ones_like(logp),
                                   spec.eps_low, spec.eps_high, spec.clip_c, None)
        loss.sum().backward()
        out[sign] = [g != 0 for g in logp.grad[0].tolist()]
    return spec, out


def _weight_of_long_responses(spec):
    """How much a 3-token response weighs against a 1-token one in the aggregated loss."""
    import torch

    from dapo.algo import aggregate_loss

    loss_tok, mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    short = aggregate_loss(loss_tok, mask, spec.loss_agg, max_len=spec.max_len).item()
    loss_tok = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    return aggregate_loss(loss_tok, mask, spec.loss_agg, max_len=spec.max_len).item() / short


def test_the_defaults_train_as_dapo():
    """Clip-Higher at [0.8, 1.28] (a positive advantage still learns at ratio 1.25), a token-level mean (a
    3-token response weighs 3x a 1-token one), dynamic sampling, overlong shaping, no KL."""
    c = load_config()
    spec, grads = _clip_grads(c)
    assert grads[1.0] == [True, True, True, True, False]  # A > 0: clipped only above 1.28
    assert grads[-1.0] == [False, True, True, True, True]  # A < 0: clipped only below 0.8
    assert _weight_of_long_responses(spec) == 3.0
    assert c.algo.dynamic_sampling and c.algo.overlong_filter and c.algo.soft_overlong and spec.kl_coef == 0.0


def test_the_grpo_preset_trains_as_naive_grpo():
    """Symmetric clip [0.8, 1.2] (ratio 1.25 no longer learns), a mean over each response first (both
    responses weigh alike), and none of DAPO's sampling or shaping."""
    c = load_config("grpo")
    spec, grads = _clip_grads(c)
    assert grads[1.0] == [True, True, True, False, False]
    assert grads[-1.0] == [False, True, True, True, True]
    assert _weight_of_long_responses(spec) == 1.0
    assert not (c.algo.dynamic_sampling or c.algo.overlong_filter or c.algo.soft_overlong)


def test_ablation_rows_are_progressive():
    switches = ["overlong_filter", "eps_high", "soft_overlong", "loss_agg", "dynamic_sampling"]
    rows = [load_config(r) for r in ABLATION_ROWS]
    for i in range(1, len(rows)):
        changed = [s for s in switches if getattr(rows[i].algo, s) != getattr(rows[i - 1].algo, s)]
        assert changed == [switches[i - 1]], (ABLATION_ROWS[i], changed)
    assert rows[-1].algo == Config().algo  # the last row is the default DAPO


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: grpo\nalgo:\n  eps_high: 0.3\noptim:\n  lr: 3e-4\n  betas: [0.9, 0.95]\n")
    c = load_config(file=f, overrides=["optim.lr=1e-3", "algo.clip_c=3"])
    assert c.preset == "grpo" and c.algo.eps_high == 0.3 and c.optim.lr == 1e-3
    assert c.optim.betas == (0.9, 0.95) and c.algo.clip_c == 3.0
    assert load_config(overrides=["algo.clip_c=none"]).algo.clip_c is None


def test_roundtrip_through_yaml(tmp_path):
    c = load_config("+clip_higher", overrides=["seed=7", "rollout.group_size=4"])
    save_config(c, tmp_path / "config.yaml")
    import yaml

    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == c


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.eps_hgh=0.3", "did you mean 'algo.eps_high'"),
        ("eps_high=0.3", "did you mean 'algo.eps_high'"),
        ("algo.ratio_level=sequence", "in dapo that is algo.policy_loss=gspo"),  # names from verl / TRL
        ("algo.clip_ratio_high=0.28", "in dapo that is algo.eps_high"),
        ("epsilon=0.2", "in dapo that is algo.eps_low"),
        ("algo.eps_high=-0.1", "algo.eps_high"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("algo.overlong_cache_len=24", "algo.overlong_cache_len"),
        ("optim.mini_batch_size=5", "divisible"),
        ("optim.lr=fast", "optim.lr: expected float"),
        ("algo.dynamic_sampling=maybe", "algo.dynamic_sampling: expected bool"),
        ("optim.steps=2.5", "optim.steps: expected int"),
        ("algo.loss_agg=sample-mean", "algo.loss_agg"),
        ("algo.refill=lazy", "algo.refill"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=[override])


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'grpo'"):
        load_config("grp")
    f = tmp_path / "bad.yaml"
    f.write_text("algo:\n  eps_hihg: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*algo.eps_high|algo.eps_hihg.*bad.yaml"):
        load_config(file=f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(file=f)


def test_config_is_frozen_and_documented():
    with pytest.raises(Exception):
        Config().seed = 3  # type: ignore[misc]
    text = describe()
    assert "algo.eps_high = 0.28" in text and "Clip-Higher" in text
    assert set(PRESETS) == set(ABLATION_ROWS) | {"gspo", "cispo", "drgrpo", "rloo"}
    assert set(PRESET_DOCS) == set(PRESETS)  # every preset is described in dapo train --help


def test_a_saved_config_keeps_its_overrides_of_preset_keys(tmp_path):
    """Resuming rebuilds the config from config.yaml: the preset must not be applied again over it (the run
    overrode algo.eps_high and algo.loss_agg, both preset keys)."""
    from dapo.config import run_config, save_config

    cfg = load_config("dapo", overrides=["algo.eps_high=0.25", "algo.loss_agg=seq-mean-token-mean"])
    save_config(cfg, tmp_path / "config.yaml")
    again = run_config(tmp_path, ["optim.steps=7"])
    assert again.algo == cfg.algo and again.optim.steps == 7 and again.preset == "dapo"
    assert run_config(tmp_path, ["preset=grpo"]).algo.eps_high == 0.2  # a preset named anew is applied
    assert run_config(tmp_path / "missing") is None
    # --preset and --config on top of the saved config change only their own keys
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.5\n")
    both = run_config(tmp_path, ["optim.steps=7"], preset="grpo", file=tmp_path / "c.yaml")
    assert (both.algo.eps_high, both.algo.loss_agg, both.optim.lr, both.optim.steps) == (
        0.2, "seq-mean-token-mean", 0.5, 7)
    assert both.eval == cfg.eval and both.optim.train_batch_size == cfg.optim.train_batch_size


def test_the_run_a_resume_names_is_found_before_anything_is_validated(tmp_path):
    from dapo.config import resume_named

    assert resume_named(None, ["optim.steps=3", "ckpt.resume=runs/a", "ckpt.resume = runs/b"]) == "runs/b"
    assert resume_named(None, ["optim.steps=3"]) == ""
    (tmp_path / "c.yaml").write_text("ckpt:\n  resume: runs/c\nalgo:\n  eps_hihg: 1\n")  # a bad key: judged later
    assert resume_named(tmp_path / "c.yaml", []) == "runs/c"
    assert resume_named(tmp_path / "c.yaml", ["ckpt.resume=runs/d"]) == "runs/d"  # the command line wins
    (tmp_path / "bad.yaml").write_text("ckpt: [\n")
    assert resume_named(tmp_path / "bad.yaml", []) == "" and resume_named(tmp_path / "none.yaml", []) == ""


def test_responses_that_do_not_split_over_the_ranks_are_refused_naming_the_keys():
    keys = ["optim.train_batch_size=3", "optim.mini_batch_size=3", "rollout.group_size=3", "dist.trainer_ranks=4"]
    with pytest.raises(ConfigError) as info:
        load_config(overrides=keys)
    assert ("dist.trainer_ranks: each optimiser step's 9 responses (optim.mini_batch_size=3 prompts x "
            "rollout.group_size=3) must split evenly over 4 ranks: set dist.trainer_ranks=3, or an") in str(info.value)
    assert load_config(overrides=keys[:3] + ["dist.trainer_ranks=3"]).dist.trainer_ranks == 3  # what it names fits


def test_gpu_layouts_that_would_share_a_gpu_behind_rays_back_are_refused():
    driver_engine = ["dist.trainer_ranks=2", "model.device=cuda"]
    with pytest.raises(ConfigError, match=r"dist\.rollout_workers: .*set dist\.rollout_workers >= 1 .*model\.device=cpu"):
        load_config(overrides=driver_engine)
    load_config(overrides=driver_engine + ["dist.rollout_workers=1"])  # the engine on a worker of its own
    load_config(overrides=driver_engine + ["dist.rollout_on_ranks=true"])  # or on the ranks themselves
    load_config(overrides=["dist.trainer_ranks=2", "model.device=cpu"])  # a CPU driver engine takes no GPU
    colocated = ["dist.rollout_workers=2", "dist.trainer_ranks=2", "dist.colocate=true"]
    load_config(overrides=colocated)
    with pytest.raises(ConfigError, match=r"dist\.async_steps: with dist\.colocate .*set dist\.async_steps=0"):
        load_config(overrides=colocated + ["dist.async_steps=1"])


def test_vllms_share_of_its_gpu_defaults_by_placement_and_a_set_value_wins():
    from dapo.rollout.vllm import gpu_memory_fraction

    cfg = load_config()
    assert cfg.rollout.gpu_memory_utilization is None
    assert gpu_memory_fraction(cfg, shares_gpu=True) == 0.5 and gpu_memory_fraction(cfg, shares_gpu=False) == 0.85
    cfg = load_config(overrides=["rollout.gpu_memory_utilization=0.7"])
    assert gpu_memory_fraction(cfg, shares_gpu=True) == gpu_memory_fraction(cfg, shares_gpu=False) == 0.7
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        load_config(overrides=["rollout.gpu_memory_utilization=1.5"])


def test_the_nvswitch_nccl_note_names_only_what_the_user_has_not_set():
    from dapo.distributed.cluster import nccl_note

    note = nccl_note({})
    assert "NCCL_CUMEM_ENABLE=0 NCCL_NVLS_ENABLE=0" in note and "ray issue 61073" in note
    assert "NCCL_CUMEM_ENABLE" not in nccl_note({"NCCL_CUMEM_ENABLE": "1"})
    assert nccl_note({"NCCL_CUMEM_ENABLE": "1", "NCCL_NVLS_ENABLE": "1"}) is None


def test_local_paths_become_absolute_and_names_that_are_not_files_stay(tmp_path, monkeypatch):
    """Paths that exist under the working directory are made absolute (a run's config.yaml is read from
    elsewhere on --resume and by dapo eval); hub ids, modules, built-in names and missing files are kept as
    spelled, so the loaders' errors name what the user wrote."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "r.py").write_text("def score(r, g, **f):\n    return 0.0\n")
    (tmp_path / "env.py").write_text("")
    (tmp_path / "calculator").mkdir()  # a directory named like the built-in tools is not them
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["data.path=d/rows.jsonl", "reward.fn=./r.py:score", "env.path=env.py:Game",
                                 "model.path=Qwen/Qwen2.5-0.5B", "eval.path=d/missing.jsonl"])
    assert cfg.data.path == str(tmp_path / "d" / "rows.jsonl")
    assert cfg.reward.fn == f"{tmp_path / 'r.py'}:score"
    assert cfg.env.path == f"{tmp_path / 'env.py'}:Game"
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B" and cfg.eval.path == "d/missing.jsonl"
    cfg = load_config(overrides=["env.tools=calculator", "reward.fn=dapo.rewards.math:score", "model.tokenizer=d",
                                 "data.path=d/rows.jsonl"])
    assert cfg.env.tools == "calculator" and cfg.reward.fn == "dapo.rewards.math:score"
    assert cfg.model.tokenizer == str(tmp_path / "d")


def test_a_section_given_a_value_says_it_is_a_section(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: 5\n")
    with pytest.raises(ConfigError, match=r"'optim' in .*c.yaml is a section, not a key: give its keys as a mapping "
                                          r"\(optim: \{\w+: \.\.\.\}\) or one at a time \(optim\.\w+=\.\.\.\); got 5"):
        load_config(file=tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="'algo' is a section, not a key"):
        load_config(overrides=["algo=dapo"])


def test_a_listing_piped_into_a_reader_that_leaves_early_ends_quietly(tmp_path):
    """`dapo train --help-config | head` ended in a BrokenPipeError traceback (stop 41): the reader here has
    closed its end before dapo writes a byte, the worst case of head's race."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # nobody will read
    p = subprocess.run([sys.executable, "-m", "dapo.cli", "train", "--help-config"], stdout=w, stderr=subprocess.PIPE,
                       timeout=120, cwd=tmp_path)
    os.close(w)
    assert p.returncode == 141 and p.stderr.decode() == "", p.stderr.decode()[-2000:]


def test_a_flags_help_is_its_keys_first_sentence_whole():
    """`dapo sft --help` cut sft.lr's text at "e.g." (stop 41): an abbreviation does not end a sentence."""
    import argparse

    from dapo.config.flags import add_key_flags

    ap = argparse.ArgumentParser()
    add_key_flags(ap, {"--lr": "sft.lr"})
    helps = {a.dest: a.help for a in ap._actions if a.dest == "sft.lr"}
    assert helps["sft.lr"] == ("sft.lr: AdamW learning rate (3e-3 for the tiny model; far lower, e.g. 1e-5, for a "
                               "pretrained one) (default 0.003)")
