"""LoRA adapters (dapo.lora) on a tiny real Qwen2: injection, training, reference, sync, checkpoints, merge."""
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from dapo.lora import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FINGERPRINT, adapter_state_dict, adapters_disabled, apply_lora, decoder_linear_names,
    has_lora, is_lora_checkpoint, load_adapter_state, load_lora_checkpoint, lora_base_path, lora_param_count,
    base_fingerprint, merge_to_hf, recorded_fingerprint, save_lora_checkpoint,
)
from dapo.model import enable_checkpointing  # noqa: E402
from dapo.rollout import HFEngine, SamplingParams  # noqa: E402
from dapo.learner.policy import make_seq_batch, response_logprobs  # noqa: E402

PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _base(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def _batch(tok):
    prompts = [tok.encode(p) for p in ["12+34=", "7+5=", "12+34=", "99+1="]]
    responses = [tok.encode(r) for r in ["46", "12:12", "45", "100"]]
    return make_seq_batch(prompts, responses, tok.pad_token_id)


def _logp(model, batch):
    with torch.no_grad():
        return response_logprobs(model, batch)[0] * batch.response_mask


def _randomise(model, seed):
    """Adapters with non-zero B: stands in for a trained adapter where the test is not about training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _adapted_modules(model):
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.fixture()
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_default_targets_are_every_decoder_linear_in_fp32_and_only_they_train(tiny_model_dir):
    model = _base(tiny_model_dir, torch.bfloat16)
    linear = decoder_linear_names(model)
    assert {n.rsplit(".", 1)[-1] for n in linear} == PROJ and len(linear) == 2 * 7
    out = apply_lora(model, rank=4, alpha=8)
    assert out is model and has_lora(model)
    assert type(model.base_model).__name__ == "Qwen2Model"  # the decoder stack, as response_logprobs needs
    assert _adapted_modules(model) == set(linear)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is never wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if ".lora_A." in n or ".lora_B." in n}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in trainable)
    # rank * (d_in + d_out) per Linear: q,k,v,o are 64 -> 64, gate/up 64 -> 128, down 128 -> 64; 2 layers
    assert lora_param_count(model) == 2 * (4 * 4 * (64 + 64) + 3 * 4 * (64 + 128)) == 8704
    assert json.loads(json.dumps(sorted(model.peft_config["default"].target_modules))) == sorted(PROJ)


def test_bf16_base_with_fp32_adapters_trains_and_samples(tiny_model_dir, tok):
    model = apply_lora(_base(tiny_model_dir, torch.bfloat16), rank=4, alpha=8)
    model.train()
    batch = _batch(tok)
    lp, _ = response_logprobs(model, batch)
    (lp * batch.response_mask).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".lora_B." in n}
    assert len(grads) == 14 and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())
    comps = HFEngine(model, tok.pad_token_id, [tok.eos_token_id]).generate(
        [tok.encode("12+34=")], SamplingParams(n=2, max_new_tokens=4), seeds=[1])
    assert len(comps) == 2 and all(len(c.token_ids) >= 1 for c in comps)


def test_targets_pick_modules_and_fall_back_to_full_names_when_a_suffix_would_match_more(tiny_model_dir):
    model = apply_lora(_base(tiny_model_dir), 2, 4, targets=["q_proj", "mlp.down_proj"])
    assert {n.rsplit(".", 1)[-1] for n in _adapted_modules(model)} == {"q_proj", "down_proj"}
    assert len(_adapted_modules(model)) == 4
    one = apply_lora(_base(tiny_model_dir), 2, 4, targets=["layers.0.self_attn.q_proj"])
    assert _adapted_modules(one) == {"model.layers.0.self_attn.q_proj"}  # not layer 1's q_proj
    assert one.peft_config["default"].target_modules == {"model.layers.0.self_attn.q_proj"}


def test_at_init_the_adapted_model_is_the_base_and_gradients_reach_only_adapters(tiny_model_dir, tok):
    batch = _batch(tok)
    model = _base(tiny_model_dir)
    before = _logp(model, batch)
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(_logp(model, batch), before)  # B = 0: the adapters add exactly zero
    model.train()
    lp, _ = response_logprobs(model, batch)
    (lp * batch.response_mask).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            assert p.grad.abs().sum() > 0, n  # d/dB = (dL/dy) (A x): non-zero
        if ".lora_A." in n:
            assert torch.equal(p.grad, torch.zeros_like(p.grad)), n  # d/dA goes through B = 0


def test_gradients_reach_adapters_with_activation_checkpointing(tiny_model_dir, tok):
    model = apply_lora(_base(tiny_model_dir), rank=4, alpha=8)
    enable_checkpointing(model)  # frozen embeddings: the checkpointed layers' input needs grad
    model.train()
    batch = _batch(tok)
    lp, _ = response_logprobs(model, batch)
    (lp * batch.response_mask).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adamw_trains_adapters_only_and_the_disabled_model_is_the_base(tiny_model_dir, tok):
    batch = _batch(tok)
    model = _base(tiny_model_dir)
    base_lp = _logp(model, batch)
    apply_lora(model, rank=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters0 = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):
        lp, _ = response_logprobs(model, batch)
        loss = -(lp * batch.response_mask).sum() / batch.response_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    after = adapter_state_dict(model)
    assert all(not torch.equal(after[k], adapters0[k]) for k in after)  # A moves too once B is non-zero
    trained_lp = _logp(model, batch)
    assert (trained_lp.sum() > base_lp.sum()) and not torch.allclose(trained_lp, base_lp)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapters_disabled(model):
        assert torch.allclose(_logp(model, batch), base_lp, atol=1e-6, rtol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(_logp(model, batch), trained_lp)


def test_adapter_tensors_alone_make_a_second_model_sample_and_score_the_same(tiny_model_dir, tok):
    batch = _batch(tok)
    trainer_side = apply_lora(_base(tiny_model_dir), rank=4, alpha=8)
    _randomise(trainer_side, seed=1)
    worker = apply_lora(_base(tiny_model_dir), rank=4, alpha=8)  # same base, its own fresh adapters
    assert not torch.allclose(_logp(worker, batch), _logp(trainer_side, batch))
    sd = adapter_state_dict(trainer_side)
    assert sum(t.numel() * t.element_size() for t in sd.values()) == 4 * lora_param_count(trainer_side)
    assert 4 * lora_param_count(trainer_side) < 0.1 * sum(t.numel() * 4 for t in trainer_side.state_dict().values())
    load_adapter_state(worker, {k: v.clone() for k, v in sd.items()})
    assert torch.equal(_logp(worker, batch), _logp(trainer_side, batch))
    prompts = [tok.encode(p) for p in ["12+34=", "7+5=", "99+1="]]
    params = SamplingParams(n=3, max_new_tokens=10)
    a = HFEngine(trainer_side, tok.pad_token_id, [tok.eos_token_id]).generate(prompts, params, seeds=[5, 6, 7])
    b = HFEngine(worker, tok.pad_token_id, [tok.eos_token_id]).generate(prompts, params, seeds=[5, 6, 7])
    assert a == b  # the same tokens and log-probs (Completions compare by value)
    # the keys are the model's own, so the engine's generic load_weights takes the dict as well
    third = HFEngine(apply_lora(_base(tiny_model_dir), rank=4, alpha=8), tok.pad_token_id, [tok.eos_token_id])
    third.load_weights({k: v.clone() for k, v in sd.items()}, version=1)
    assert [c.token_ids.tolist() for c in third.generate(prompts, params, seeds=[5, 6, 7])] == [c.token_ids.tolist() for c in a]
    # and the engine samples from the adapted policy, not the base
    with adapters_disabled(trainer_side):
        base = HFEngine(trainer_side, tok.pad_token_id, [tok.eos_token_id]).generate(prompts, params, seeds=[5, 6, 7])
    assert [c.logprobs.tolist() for c in base] != [c.logprobs.tolist() for c in a]


def test_load_adapter_state_rejects_other_shapes_keys_and_plain_models(tiny_model_dir):
    sd = adapter_state_dict(apply_lora(_base(tiny_model_dir), rank=4, alpha=8))
    with pytest.raises(ValueError, match=r"has shape \(4, 64\), the model.s adapter \(2, 64\)"):
        load_adapter_state(apply_lora(_base(tiny_model_dir), rank=2, alpha=8), sd)
    with pytest.raises(ValueError, match="24 unexpected"):
        load_adapter_state(apply_lora(_base(tiny_model_dir), rank=4, alpha=8, targets=["q_proj"]), sd)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_adapter_state(_base(tiny_model_dir), sd)


@pytest.mark.parametrize("whole", [True, False], ids=["hashed whole", "sampled (a file over the size limit)"])
def test_a_base_fingerprint_follows_its_weights_not_its_place(tiny_model_dir, tmp_path, monkeypatch, whole):
    import dapo.lora as lora_mod

    if not whole:  # the tiny model's file read as a large one is: its head, tail and 64 blocks between
        for name, value in (("_WHOLE_FILE", 1000), ("_HEAD", 1000), ("_BLOCK", 100), ("_fingerprints", {})):
            monkeypatch.setattr(lora_mod, name, value)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    assert base_fingerprint(a) == base_fingerprint(b) == base_fingerprint(tiny_model_dir) is not None  # a copy: same
    (b / "config.json").write_text((b / "config.json").read_text() + " ")  # not the weights: same
    assert base_fingerprint(b) == base_fingerprint(a)
    size = (b / "model.safetensors").stat().st_size
    with open(b / "model.safetensors", "r+b") as f:  # one byte of the weights, same size (in a sampled block)
        f.seek(size - 20 if whole else size * 7 // 65 + 50)
        x = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([x[0] ^ 1]))
    assert base_fingerprint(b) != base_fingerprint(a)
    (a / "model.safetensors").rename(a / "other.safetensors")  # a file's name is part of it
    assert base_fingerprint(a) != base_fingerprint(tiny_model_dir)
    assert base_fingerprint("Qwen/Qwen2.5-0.5B") is None and base_fingerprint(tmp_path) is None  # hub id, no weights


def test_checkpoint_roundtrip_restores_exact_adapters_and_peft_reads_it(tiny_model_dir, tok, tmp_path):
    batch = _batch(tok)
    model = apply_lora(_base(tiny_model_dir), rank=4, alpha=8)
    _randomise(model, seed=2)
    ckpt = save_lora_checkpoint(model, tmp_path / "step_3")
    assert sorted(p.name for p in ckpt.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FINGERPRINT]
    assert recorded_fingerprint(ckpt) == base_fingerprint(tiny_model_dir) is not None
    assert is_lora_checkpoint(ckpt) and not is_lora_checkpoint(tiny_model_dir)
    assert lora_base_path(ckpt) == str(tiny_model_dir)  # the path the base was loaded from
    cfg = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 8, "LORA")
    on_disk = load_file(str(ckpt / ADAPTER_WEIGHTS))
    assert sum(t.numel() for t in on_disk.values()) == lora_param_count(model)
    assert all(t.dtype == torch.float32 for t in on_disk.values())
    from peft.utils import get_peft_model_state_dict

    assert set(on_disk) == {"base_model.model." + k for k in get_peft_model_state_dict(model)}  # peft's names
    want = adapter_state_dict(model)
    for restored in (load_lora_checkpoint(_base(tiny_model_dir), ckpt),  # plain base: adapters created
                     load_lora_checkpoint(apply_lora(_base(tiny_model_dir), 4, 8), ckpt)):  # resumed run
        got = adapter_state_dict(restored)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(_logp(restored, batch), _logp(model, batch))
    with pytest.raises(ValueError, match="r=4 .* differs .* r=2"):
        load_lora_checkpoint(apply_lora(_base(tiny_model_dir), 2, 8), ckpt)
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(_base(tiny_model_dir), str(ckpt))
    assert torch.equal(_logp(wrapped.base_model.model, batch), _logp(model, batch))
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        load_lora_checkpoint(_base(tiny_model_dir), tmp_path)


def test_merged_model_is_plain_hf_with_the_adapted_log_probs(tiny_model_dir, tok, tmp_path):
    batch = _batch(tok)
    model = apply_lora(_base(tiny_model_dir), rank=4, alpha=8)
    _randomise(model, seed=3)
    ckpt = save_lora_checkpoint(model, tmp_path / "ckpt", base_model_path=str(tiny_model_dir))
    with warnings.catch_warnings():  # no library deprecation warning reaches the user's export
        warnings.simplefilter("error", FutureWarning)
        out = merge_to_hf(None, ckpt, tmp_path / "merged")  # base path read from adapter_config.json
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert (out / "tokenizer.json").is_file() and not (out / ADAPTER_CONFIG).exists()
    merged = _base(out)
    assert not has_lora(merged)
    want = _logp(model, batch)
    assert torch.allclose(_logp(merged, batch), want, atol=1e-5, rtol=0)
    assert not torch.allclose(_logp(_base(tiny_model_dir), batch), want, atol=1e-3, rtol=0)
    # a process where peft cannot be imported loads it with every weight in place
    code = ("import sys; sys.modules['peft'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, output_loading_info=True)\n"
            "AutoTokenizer.from_pretrained(%r)\n"
            "assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info\n" % str(out))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    # a base model object works too (its weights become the merged ones)
    base = _base(tiny_model_dir)
    merge_to_hf(base, ckpt, tmp_path / "merged2")
    assert torch.allclose(_logp(base, batch), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="without adapters"):
        merge_to_hf(model, ckpt, tmp_path / "merged3")


@pytest.mark.parametrize("kwargs, arg", [
    ({"rank": 0, "alpha": 8}, "rank"), ({"rank": 2.5, "alpha": 8}, "rank"), ({"rank": True, "alpha": 8}, "rank"),
    ({"rank": 4, "alpha": 0}, "alpha"), ({"rank": 4, "alpha": -1.0}, "alpha"),
    ({"rank": 4, "alpha": 8, "dropout": 1.0}, "dropout"),
])
def test_bad_rank_alpha_dropout_name_the_argument(tiny_model_dir, kwargs, arg):
    model = _base(tiny_model_dir)
    with pytest.raises(ValueError, match=f"{arg} must be"):
        apply_lora(model, **kwargs)
    assert not has_lora(model)


def test_targets_matching_nothing_list_the_linear_names_found(tiny_model_dir):
    model = _base(tiny_model_dir)
    for bad, missing in ((["qkv", "q_proj"], "['qkv']"), (["lm_head"], "['lm_head']"), ("embed_tokens", "['embed_tokens']")):
        with pytest.raises(ValueError, match=r"match no Linear layer") as e:
            apply_lora(model, 4, 8, targets=bad)
        msg = str(e.value)
        assert f"targets {missing} match" in msg  # only the culprits, and the LM head is not a target
        assert msg.endswith("named: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")  # no full paths
    assert not has_lora(model)


def test_a_model_with_adapters_is_not_adapted_twice(tiny_model_dir):
    model = apply_lora(_base(tiny_model_dir), 4, 8)
    n = lora_param_count(model)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, 4, 8)
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(_base(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(wrapped, 4, 8)
    assert lora_param_count(model) == n


def test_the_engine_samples_from_merged_weights_what_the_unmerged_adapters_sample(tiny_model_dir, tok):
    """Merged (W + alpha/r B A, alpha/r = 2 here) and unmerged sampling: the same tokens for the same seeds in
    float32, log-probs within rounding; the trained model is only read."""
    model = apply_lora(_base(tiny_model_dir), rank=4, alpha=8)
    _randomise(model, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    net, mods = merged.merged.model, dict(model.named_modules())
    assert not has_lora(net) and net.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied
    for name in _adapted_modules(model):
        w, layer = net.get_submodule(name).weight, mods[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert w.data_ptr() != layer.base_layer.weight.data_ptr()
        torch.testing.assert_close(w, layer.base_layer.weight + 2.0 * b @ a, atol=1e-6, rtol=0)
    prompts = [tok.encode(p) for p in ["12+34=", "7+5=", "99+1="]]
    params, seeds = SamplingParams(n=4, max_new_tokens=12), [5, 6, 7]
    got = merged.generate(prompts, params, seeds)
    want = HFEngine(model, tok.pad_token_id, [tok.eos_token_id], merge_lora=False).generate(prompts, params, seeds)
    assert [c.token_ids.tolist() for c in got] == [c.token_ids.tolist() for c in want]
    diff = max((x.logprobs - y.logprobs).abs().max().item() for x, y in zip(got, want))
    assert diff < 1e-5
    with adapters_disabled(model):
        base = HFEngine(model, tok.pad_token_id, [tok.eos_token_id]).generate(prompts, params, seeds)
    assert max((x.logprobs[:2] - y.logprobs[:2]).abs().max().item() for x, y in zip(base, want)) > 1e-3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_bf16_base_merges_in_float32_and_rounds_once(tiny_model_dir):
    model = apply_lora(_base(tiny_model_dir, torch.bfloat16), rank=4, alpha=8)
    _randomise(model, seed=2)
    engine = HFEngine(model, 0, [1], compute_dtype=torch.bfloat16)
    layer = model.model.layers[1].mlp.down_proj
    w = engine.merged.model.model.layers[1].mlp.down_proj.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    exact = layer.base_layer.weight.float() + 2.0 * b @ a
    assert w.dtype == torch.bfloat16 and not torch.equal(w, layer.base_layer.weight)
    # one rounding of the float32 sum: within half a bf16 step of it (2^-8 of the value), plus float32 noise
    assert ((w.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
