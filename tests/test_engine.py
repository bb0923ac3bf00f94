"""The rollout engine (engine.py) and the static-shape decode step (model.decode_step, compile_decode).

References: F.linear on the same weights (the training copy), the plain forward pass, and the unpacked
model's own generate: the engine may only change the speed and float32 rounding, never the tokens.
"""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

import engine
import losspass
import model as M
import precision
import prefixcache
from sampling import generate

pytestmark = pytest.mark.skipif(not engine.CPU_FAST_LAYOUT, reason="this torch build has no oneDNN")
# inductor writes C++ for CPUs and needs a compiler; without one, aot_eager still traces the same graph
# (static shapes, the packed products as custom ops) and runs it op by op.
BACKEND = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    packed, tok = M.load_model(smollm2_path)
    return packed, engine.unpack(copy.deepcopy(packed)), tok


def test_packed_product_equals_f_linear():
    torch.manual_seed(0)
    for bias in (False, True):
        layer = M.Linear(64, 48, bias=bias)
        engine.pack(layer)
        for shape in ((1, 64), (5, 64), (2, 3, 64)):
            x = torch.randn(*shape)
            with torch.no_grad():
                got = engine.linear(x, layer)
                torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
            assert got.shape == (*shape[:-1], 48)
        with torch.enable_grad():
            assert engine.linear(x, layer) is None  # gradients take the training copy
        assert engine.linear(x.double(), layer) is None


def test_load_model_packs_float32_cpu_weights_only(tiny_checkpoints):
    folder = tiny_checkpoints["qwen2"][0]
    net, _ = M.load_model(folder)
    layers = engine.layers_of(net)
    assert len(layers) == 7 * net.cfg.n_layers + 1 and all(la.packed is not None for la in layers)
    half, _ = M.load_model(folder, dtype=torch.bfloat16)
    assert all(la.packed is None for la in engine.layers_of(half))  # cpu16.py's path, not the engine's
    assert all(la.packed is None for la in engine.layers_of(copy.deepcopy(net)))  # a copy has other weights


def test_engine_greedy_tokens_and_logprobs_equal_eager(smollm2):
    """Real SmolLM2, 8 left-padded prompts x 32 tokens: greedy tokens identical with and without the engine;
    sampled tokens' log-probs (the "old" policy of GRPO/PPO) equal the plain model's re-scoring of them."""
    packed, plain, tok = smollm2
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in (
        "What is the capital of France?", "Name three colours.", "Why is the sky blue?", "Write a haiku.",
        "What did Caroline adopt?", "Give me a synonym for happy.", "How many legs has a spider?", "Hi!")]
    a, la = generate(packed, prompts, 32, temperature=0, return_logprobs=True)
    b, lb = generate(plain, prompts, 32, temperature=0, return_logprobs=True)
    assert a == b and any(len(r) > 8 for r in a)
    assert max(abs(x - y) for ra, rb in zip(la, lb) for x, y in zip(ra, rb)) <= 1e-4
    # Sampled: a 1e-6 change of the distribution may move an inverse-CDF draw across a boundary, so the
    # tokens are compared through their log-probs: the engine's, against the plain model's teacher-forced pass.
    tokens, logps = generate(packed, prompts, 32, temperature=1.0, seed=0, return_logprobs=True)
    with torch.no_grad():
        for p, t, lp in zip(prompts, tokens, logps):
            want, _ = losspass.completion_logprobs(plain, p, [t], temperature=1.0)
            assert (torch.tensor(lp) - want[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("products", ["float32", pytest.param("bf16", marks=pytest.mark.skipif(
    not engine.CPU_BF16_LAYOUT, reason="no oneDNN bf16 kernels on this CPU"))])
def test_engine_follows_an_optimizer_step(tiny_checkpoints, products):
    """After a step the stale copies are not used (F.linear instead: exactly the updated model); after sync
    the copies are current again and the engine's logits equal the updated training copy's: to float32
    rounding, or with bf16 products (precision.py) to bf16 rounding in another summation order."""
    precision.use(products)  # conftest restores float32 after the test
    dtype = torch.bfloat16 if products == "bf16" else torch.float32
    net, _ = M.load_model(tiny_checkpoints["llama"][0])
    assert net.layers[0].wq.packed.dtype == dtype
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    logp, mask = losspass.completion_logprobs(net, [1, 2, 3], [[4, 5, 6], [7, 8]])
    (-(logp * mask).sum()).backward()
    opt.step()
    layers = engine.layers_of(net)
    assert not any(la.packed.current(la.weight) for la in layers)
    reference = engine.unpack(copy.deepcopy(net))
    with torch.no_grad():
        want = reference(ids)
        assert torch.equal(net(ids), want)  # stale copies fall back to F.linear on the new weights
        seconds = engine.sync(net)
        assert seconds >= 0 and all(la.packed.current(la.weight) for la in layers)
        assert net.layers[0].wq.packed.dtype == dtype  # re-packed in the run's precision
        tol = 1e-5 if products == "float32" else 3e-2
        torch.testing.assert_close(net(ids), want, rtol=tol, atol=tol)
        before = [la.packed for la in layers]
        engine.sync(net)  # nothing changed: nothing re-packed
        assert all(la.packed is p for la, p in zip(layers, before))


def test_decode_step_equals_forward_with_left_padding(tiny_checkpoints):
    net, _ = M.load_model(tiny_checkpoints["qwen3"][0])
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    a, b = net.new_cache(2, 12), net.new_cache(2, 12)
    with torch.no_grad():
        net(ids, real, cache=a)
        net(ids, real, cache=b)
        for token in ([3, 4], [20, 21], [1, 2]):
            t = torch.tensor(token)
            want = net(t[:, None], cache=a)[:, -1]
            torch.testing.assert_close(net.decode_step(t, b), want, rtol=1e-5, atol=1e-5)
    assert a.len == b.len == 8 and torch.equal(a.next_pos, b.next_pos) and torch.equal(a.valid, b.valid)


def test_compiled_decode_step_gives_the_same_tokens(tiny_checkpoints):
    net, _ = M.load_model(tiny_checkpoints["llama"][0])
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8]]
    want, lw = generate(net, prompts, 6, temperature=1.0, seed=3, stop_ids=(), return_logprobs=True)
    M.compile_decode(net, backend=BACKEND)
    got, lg = generate(net, prompts, 6, temperature=1.0, seed=3, stop_ids=(), return_logprobs=True)
    assert got == want
    torch.testing.assert_close(torch.tensor(lg), torch.tensor(lw), rtol=0, atol=1e-4)


def test_common_prefix_is_prefilled_once_with_the_same_results(tiny_checkpoints, monkeypatch):
    """Prompts sharing 20 tokens (an agent's system prompt) give the same tokens and log-probs when the
    prefix runs once (sampling.prefill) as when every prompt runs whole."""
    import sampling
    assert prefixcache.common_prefix([(1, 2, 3, 4), (1, 2, 5), (1, 2, 3)]) == 2
    assert prefixcache.common_prefix([(1, 2, 3), (1, 2, 3, 4)]) == 2  # each keeps a token of its own
    net, _ = M.load_model(tiny_checkpoints["qwen2"][0])
    net.turn_ids = ()  # prompts without a chat format: the shared prefix is their common prefix (split_point)
    system = list(range(30, 50))
    prompts = [system + [7, 8, 9], system + [10], system + [7, 8, 9], system + [11, 12, 13, 14, 15]]
    calls = []
    forward = M.Transformer.forward
    monkeypatch.setattr(M.Transformer, "forward", lambda self, ids, *a, **k: calls.append(ids.shape) or
                        forward(self, ids, *a, **k))
    got, lg = generate(net, prompts, 5, temperature=1.0, seed=1, stop_ids=(), return_logprobs=True)
    assert calls[:2] == [(1, 20), (3, 5)]  # the prefix once, then the 3 distinct rests, left-padded
    monkeypatch.setattr(prefixcache, "SHARED_PREFIX_MIN", 10**9)
    want, lw = generate(net, prompts, 5, temperature=1.0, seed=1, stop_ids=(), return_logprobs=True)
    assert got == want
    torch.testing.assert_close(torch.tensor(lg), torch.tensor(lw), rtol=0, atol=1e-5)


def test_split_point_cuts_at_the_last_whole_turn_and_needs_a_long_enough_prefix(tiny_checkpoints, monkeypatch):
    net, _ = M.load_model(tiny_checkpoints["qwen2"][0])
    net.turn_ids = ()
    system, T = [1] + list(range(30, 50)), 1  # token 1 starts each turn
    a, b = system + [T, 7, 8, 9, T, 5], system + [T, 7, 8, 2, T, 5]
    assert prefixcache.split_point(net, [a, b]) == prefixcache.common_prefix([a, b]) == 24  # no chat format
    assert prefixcache.split_point(net, [a]) == 0  # ... and for one prompt, no cut
    net.turn_ids = (T,)
    assert prefixcache.split_point(net, [a, b]) == 21  # the user turns differ after 3 tokens: cut before them
    assert prefixcache.split_point(net, [a]) == 21  # one prompt: before its last user turn
    monkeypatch.setattr(prefixcache, "SHARED_PREFIX_MIN", 22)
    assert prefixcache.split_point(net, [a, b]) == 0


def test_rollout_batches_read_shared_segments_without_copies_and_sample_the_same(tiny_checkpoints):
    """A GRPO rollout's batch (3 distinct prompts, each 4 times in a row, after a shared system turn): the system
    turn is one segment, each prompt's rest a segment its 4 rows share, and each row owns only its new tokens
    (sampling.prefill); decoding reads them by cascade attention. Tokens and log-probs equal those of every row
    prefilled whole (share_prefix off: sync_steps), to float32 rounding."""
    import sampling
    net, _ = M.load_model(tiny_checkpoints["qwen2"][0])
    net.turn_ids = (1,)
    system = [1] + list(range(30, 50))
    distinct = [system + [1, 7, 8, 9, 1, 5], system + [1, 10, 1, 5], system + [1, 11, 12, 13, 14, 15, 1, 5]]
    prompts = [p for p in distinct for _ in range(4)]
    _, cache = sampling.prefill(net, prompts, 6)
    assert [seg.k[0].shape[:3] for seg in cache.above] == [(1, 2, 21), (3, 2, 8)]  # [rows, Hkv, slots]
    assert cache.k[0].shape[0] == 12 and cache.k[0].shape[2] == 6  # own slots: the new tokens only
    got, lg = generate(net, prompts, 6, temperature=1.0, seed=3, stop_ids=(), return_logprobs=True)
    want, lw = generate(net, prompts, 6, temperature=1.0, seed=3, stop_ids=(), return_logprobs=True, sync_steps=True)
    assert got == want and len({tuple(t) for t in got}) > 3
    torch.testing.assert_close(torch.tensor(lg), torch.tensor(lw), rtol=0, atol=1e-5)
    scored = sampling.continuation_logprobs(net, prompts, got)  # teacher forcing through the same segments
    plain = []
    for p, c in zip(prompts, got):
        logp = torch.log_softmax(net(torch.tensor([p + c]))[0, len(p) - 1:-1].float(), -1)
        plain.append(logp.gather(-1, torch.tensor(c)[:, None]).sum().item() +
                     torch.logsumexp(torch.log_softmax(net(torch.tensor([p + c]))[0, -1].float(), -1)[list(net.stop_ids)], 0).item())
    torch.testing.assert_close(torch.tensor(scored), torch.tensor(plain), rtol=0, atol=1e-4)


def test_a_frozen_models_system_turn_is_computed_once_until_its_weights_change(tiny_checkpoints):
    net, _ = M.load_model(tiny_checkpoints["qwen2"][0])
    net.turn_ids = (1,)
    system = tuple([1] + list(range(30, 50)))
    first = prefixcache.prefix_segment(net, system)
    assert prefixcache.prefix_segment(net, system) is first  # kept: the same tensors
    assert prefixcache.prefix_segment(net, system[:-1]) is not first  # other tokens: computed
    again = prefixcache.prefix_segment(net, system)
    with torch.no_grad():
        net.layers[0].wk.weight.mul_(1.5)  # an optimizer step writes in place
    changed = prefixcache.prefix_segment(net, system)
    assert changed is not again and not torch.equal(changed.k[0], again.k[0])
    torch.testing.assert_close(again.k[0], first.k[0], rtol=0, atol=0)  # the same tokens, the same numbers


def test_compiled_decode_step_on_smollm2_gives_the_same_greedy_tokens(smollm2):
    """The compiled step (custom-op products from the packed copies, inductor for the rest) on the real model:
    8 prompts x 32 greedy tokens identical to the eager engine's (~50 s, most of it compiling)."""
    packed, _, tok = smollm2
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in (
        "What is the capital of France?", "Name three colours.", "Why is the sky blue?", "Write a haiku.",
        "What did Caroline adopt?", "Give me a synonym for happy.", "How many legs has a spider?", "Hi!")]
    want = generate(packed, prompts, 32, temperature=0)
    M.compile_decode(packed, backend=BACKEND)
    try:
        assert generate(packed, prompts, 32, temperature=0) == want
    finally:
        packed.step_fn = None


def test_a_kv_cache_larger_than_free_memory_is_refused_with_its_size(tiny_checkpoints, monkeypatch):
    import sampling
    net, _ = M.load_model(tiny_checkpoints["llama"][0])
    cfg = net.cfg
    per_row = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * (4 + 6)  # 4 prompt + 6 new tokens, float32
    monkeypatch.setattr(sampling, "free_memory", lambda device: 3 * per_row)
    assert len(generate(net, [[1, 2, 3, 4]] * 3, 6, temperature=0, stop_ids=())) == 3  # exactly fits
    with pytest.raises(MemoryError, match=r"4 rows x 10 tokens needs .* lower the batch"):
        generate(net, [[1, 2, 3, 4]] * 4, 6, temperature=0, stop_ids=())
