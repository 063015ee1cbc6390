"""HFEngine internals on a real tiny Qwen2: the growing KV storage, the 2D/4D decode masks, the
flash-attention guard, and no deprecation warnings from transformers on the cache keyword."""
import logging
import warnings

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from dapo.rollout import HFEngine, SamplingParams
from dapo.rollout.hf import _BufferedLayer
from dapo.learner.policy import make_seq_batch, response_logprobs

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15], [20, 21, 22, 23]]
EOS = (3, 17, 40, 55, 71)  # several stop ids so a random model stops at varied lengths (compaction happens)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _same_samples(a, b):
    assert [c.prompt_index for c in a] == [c.prompt_index for c in b]
    assert [c.token_ids.tolist() for c in a] == [c.token_ids.tolist() for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=0)


def test_buffered_layer_grows_by_doubling_up_to_its_cap_and_keeps_what_it_holds():
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 3, 2, 4, generator=g), torch.randn(2, 3, 2, 4, generator=g)
    layer = _BufferedLayer(k0, v0, capacity=3, max_capacity=10)
    ks, vs, caps = [k0], [v0], [layer.capacity]
    for _ in range(8):
        k, v = torch.randn(2, 3, 1, 4, generator=g), torch.randn(2, 3, 1, 4, generator=g)
        keys, values = layer.update(k, v)
        ks.append(k)
        vs.append(v)
        caps.append(layer.capacity)
    assert caps == [3, 3, 6, 6, 6, 10, 10, 10, 10]  # 3 -> 6 -> 12, capped at 10
    assert torch.equal(keys, torch.cat(ks, dim=2)) and torch.equal(values, torch.cat(vs, dim=2))
    layer.batch_select_indices(torch.tensor([1]))  # compaction keeps the capacity and the filled part
    assert layer.capacity == 10 and torch.equal(layer.keys, torch.cat(ks, dim=2)[1:])
    # a chunk longer than twice the storage gets exactly what it needs
    big = _BufferedLayer(k0, v0, capacity=2)
    big.update(torch.zeros(2, 3, 7, 4), torch.zeros(2, 3, 7, 4))
    assert big.capacity == 9 and big.n == 9


def test_dropping_finished_rows_gives_the_samples_of_a_batch_that_keeps_them(model, monkeypatch):
    """Compaction (index_select of the filled part into new storage) changes nothing a row samples, whether it runs
    after the first finished row or never; and it keeps exactly the selected rows, in the order asked."""
    k = torch.randn(5, 2, 6, 3)
    layer = _BufferedLayer(k[:, :, :4], k[:, :, :4].neg(), capacity=6)
    layer.batch_select_indices(torch.tensor([4, 0, 2]))
    assert torch.equal(layer.keys, k[[4, 0, 2], :, :4]) and torch.equal(layer.values, -k[[4, 0, 2], :, :4])
    assert layer.capacity == 6
    p = SamplingParams(n=6, max_new_tokens=40)
    seeds = [7, 8, 9, 10]
    eager = HFEngine(model, 0, EOS)
    eager.compact_frac = 0.0  # every step with a finished row compacts
    never = HFEngine(model, 0, EOS)
    never.compact_frac = 2.0  # never compacts
    a, b = eager.generate(PROMPTS, p, seeds), never.generate(PROMPTS, p, seeds)
    _same_samples(a, b)
    assert {c.finish_reason for c in a} == {"stop", "length"}


def test_growing_kv_storage_gives_the_samples_of_a_fully_reserved_one(model, monkeypatch):
    grows, compactions = [], []
    real_grow, real_select = _BufferedLayer._grow, _BufferedLayer.batch_select_indices

    def grow(self, need):
        grows.append((self.capacity, need))
        real_grow(self, need)

    def select(self, idx):
        compactions.append(len(idx))
        real_select(self, idx)

    monkeypatch.setattr(_BufferedLayer, "_grow", grow)
    monkeypatch.setattr(_BufferedLayer, "batch_select_indices", select)
    p = SamplingParams(n=6, max_new_tokens=40)
    seeds = [101, 102, 103, 104]
    full = HFEngine(model, 0, EOS, kv_headroom=None).generate(PROMPTS, p, seeds)
    assert grows == [] and compactions  # all room reserved up front; finished rows were dropped
    grows.clear()
    compactions.clear()
    tiny = HFEngine(model, 0, EOS, kv_headroom=1).generate(PROMPTS, p, seeds)
    n_layers = model.config.num_hidden_layers
    assert len(grows) >= 3 * n_layers and compactions  # several doublings, with compaction between them
    assert all(need <= 6 + 40 for _, need in grows)  # never past prompt + max_new_tokens
    _same_samples(full, tiny)
    assert {c.finish_reason for c in tiny} == {"stop", "length"}
    # the default headroom and a small batch (several batches) agree too
    _same_samples(full, HFEngine(model, 0, EOS, max_batch=5, kv_headroom=4).generate(PROMPTS, p, seeds))


def test_bf16_sampling_keeps_its_kv_cache_in_bf16_and_samples_what_a_float32_cache_does(model, monkeypatch):
    """A float32 model sampled under bf16 autocast writes float32 keys (RoPE's float32 cos/sin promote the
    bf16 projection) and bf16 values; attention casts both to bf16 before reading them. The cache is kept in
    bf16: 2 bytes a key instead of 4, and the same tokens and log-probs as a float32 cache."""
    made = []
    real_init = _BufferedLayer.__init__

    def init(self, keys, values, *a, **kw):
        real_init(self, keys, values, *a, **kw)
        made.append((keys.dtype, values.dtype, self._k.dtype, self._v.dtype))

    monkeypatch.setattr(_BufferedLayer, "__init__", init)
    p = SamplingParams(n=4, max_new_tokens=24)
    seeds = [7, 8, 9, 10]
    bf16 = HFEngine(model, 0, EOS, compute_dtype=torch.bfloat16).generate(PROMPTS, p, seeds)
    written = {m[:2] for m in made}
    assert written == {(torch.float32, torch.bfloat16)}  # what the model hands the cache under autocast
    assert {m[2:] for m in made} == {(torch.bfloat16, torch.bfloat16)}  # what the cache keeps
    made.clear()
    f32 = HFEngine(model, 0, EOS, compute_dtype=torch.bfloat16, kv_dtype=torch.float32).generate(PROMPTS, p, seeds)
    assert {m[2:] for m in made} == {(torch.float32, torch.float32)}
    assert [c.token_ids.tolist() for c in bf16] == [c.token_ids.tolist() for c in f32]
    for a, b in zip(bf16, f32):
        assert torch.equal(a.logprobs, b.logprobs)
    made.clear()
    HFEngine(model, 0, EOS).generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=4), seeds[:1])
    assert {m[2:] for m in made} == {(torch.float32, torch.float32)}  # float32 compute: float32 cache


def _mask_dims(model):
    dims = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: dims.append(kw["attention_mask"].dim()), with_kwargs=True)
    return dims, hook


def test_2d_mask_path_samples_what_the_4d_path_does(model):
    p = SamplingParams(n=4, max_new_tokens=12, temperature=0.8)
    seeds = [7, 8, 9, 10]
    assert model.config._attn_implementation == "sdpa"
    dims, hook = _mask_dims(model)
    try:
        eng = HFEngine(model, 0, EOS)
        eng.lean = False  # transformers' forward at every step (the lean step takes the 4D mask itself)
        four = eng.generate(PROMPTS, p, seeds)
        assert dims[0] == 2 and set(dims[1:]) == {4}  # prefill 2D, decode ready-made 4D
        dims.clear()
        eng = HFEngine(model, 0, EOS)
        eng.prebuilt_mask = False
        two = eng.generate(PROMPTS, p, seeds)
        assert set(dims) == {2}
    finally:
        hook.remove()
    _same_samples(four, two)
    _same_samples(four, HFEngine(model, 0, EOS).generate(PROMPTS, p, seeds))  # and the lean step


def test_attention_other_than_sdpa_or_eager_gets_the_2d_mask(tiny_model_dir):
    """A registered attention function stands in for flash_attention_2 (not installable here): any
    implementation other than sdpa/eager must be given the 2D padding mask in decode."""
    seen = []

    def probe(module, q, k, v, attention_mask, **kw):
        seen.append(attention_mask.shape)
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register("dapo_probe", probe)
    AttentionMaskInterface.register("dapo_probe", sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    p = SamplingParams(n=3, max_new_tokens=10)
    ref = HFEngine(model, 0, EOS).generate(PROMPTS, p, [1, 2, 3, 4])
    model.set_attn_implementation("dapo_probe")
    dims, hook = _mask_dims(model)
    try:
        out = HFEngine(model, 0, EOS).generate(PROMPTS, p, [1, 2, 3, 4])
    finally:
        hook.remove()
    assert seen and set(dims) == {2}
    _same_samples(ref, out)


def test_flash_attention_without_flash_attn_is_refused_at_engine_construction(model, monkeypatch):
    import importlib.util

    with pytest.raises(ValueError, match="kv_headroom"):
        HFEngine(model, 0, EOS, kv_headroom=0)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")  # as if changed after loading
    with pytest.raises(ImportError, match="model.attn_implementation=flash_attention_2 needs the flash_attn"):
        HFEngine(model, 0, EOS)


def test_generate_and_logprobs_raise_no_deprecation_warnings(model):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers logs each deprecation once per process
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comps = HFEngine(model, 0, EOS).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6), [1, 2, 3, 4])
            sb = make_seq_batch([PROMPTS[c.prompt_index] for c in comps], [c.token_ids for c in comps], pad_id=0)
            lp, _ = response_logprobs(model, sb)  # shares each prompt's cache among its 2 rows
    finally:
        tf_logger.removeHandler(handler)
    assert lp.shape[0] == len(comps)
    bad = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, [str(w.message) for w in bad]
    assert not [r for r in records if "deprecat" in r.getMessage().lower()], [r.getMessage() for r in records]


# ------------------------------------------------------------------------------------------------ the weight-sync guard


def _moved(model, seed):
    """The state dict of a float32 copy of ``model`` with every parameter moved (a step's worth; tied ones stay tied)."""
    import copy

    moved = copy.deepcopy(model).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return moved.state_dict()


def test_hf_guard_passes_a_whole_push_and_names_a_corrupted_or_missing_tensor(tiny_model_dir):
    from dapo.model import tied_copies
    from dapo.rollout.base import WeightSyncError, weight_fingerprints

    own = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)  # a sampler's own bf16 copy
    eng = HFEngine(own, 0, EOS)
    assert eng.weight_dtype == torch.bfloat16
    sd = _moved(own, 0)
    expected = weight_fingerprints(((k, v) for k, v in sd.items() if k not in tied_copies(own)), eng.weight_dtype)
    eng.load_weights(sd, 1)
    eng.check_weights(expected)
    name = "model.layers.1.mlp.down_proj.weight"
    eng.load_weights({**sd, name: sd[name].flip(0) * 0.5}, 2)  # one tensor corrupted on the way
    with pytest.raises(WeightSyncError, match=rf"HF rollout engine holds other values for {name} "):
        eng.check_weights(expected)
    eng.load_weights(_moved(own, 1), 3)  # a stale engine, then a push that leaves one tensor out
    eng.load_weights({k: v for k, v in sd.items() if k != "model.norm.weight"}, 4)
    with pytest.raises(WeightSyncError, match=r"other values for model\.norm\.weight "):
        eng.check_weights(expected)
