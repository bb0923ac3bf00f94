"""precision.py: bf16 products where they pay, float32 everywhere else.

References: products recomputed by hand in float64 from the bf16-rounded inputs (what a bf16 product with
float32 accumulation must round to), the float32 model's log-probs, and the float32 GRPO update on the same
rollout. The bounds on whole-model log-probs are derived in the docstrings.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import engine
import losspass
import model as M
import precision
from grpo import grpo_loss
from sampling import generate

BF16_EPS = 2.0 ** -8  # bf16's spacing at 1 (8 significand bits): a rounding moves a value by <= half of it


def bf16_reference(x, w):
    """x @ w.T from the bf16-rounded inputs, exact in float64, then rounded to bf16 once."""
    return (x.bfloat16().double() @ w.bfloat16().double().T).bfloat16().float()


def test_choose_follows_the_flag_and_the_probe(monkeypatch):
    monkeypatch.setattr(precision, "bf16_units", lambda device: True)
    slow = {"float32": 1.0, "float32_packed": 0.6, "bf16": 0.9, "bf16_packed": 0.5}  # 1.2x: below MIN_SPEEDUP
    fast = {"float32": 1.0, "float32_packed": 0.6, "bf16": 0.4, "bf16_packed": 0.3}  # 2x
    assert precision.choose("auto", "cpu", slow) == "float32"
    assert precision.choose("auto", "cpu", fast) == "bf16"
    assert precision.choose("float32", "cpu", fast) == "float32" and precision.choose("bf16", "cpu", slow) == "bf16"
    monkeypatch.setattr(precision, "bf16_units", lambda device: False)  # an AVX2 CPU: no probe needed
    assert precision.choose("auto", "cpu", fast) == "float32"
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        precision.choose("fp8", "cpu")
    # the float32 decode kernel: the probe's faster one
    precision.use("float32", {"float32": 1.0, "float32_packed": 2.0})
    assert precision.PACK_FLOAT32 is False
    layer = engine.pack(M.Linear(8, 4))
    assert layer.packed is None  # F.linear decodes float32 where it was the faster
    precision.use("float32", {"float32": 1.0, "float32_packed": 0.5})
    assert precision.PACK_FLOAT32 is True and engine.pack(layer).packed is not None


def test_probe_times_every_path_this_machine_has():
    t = precision.probe(rows=4, d_in=16, d_out=8)
    assert t["float32"] > 0 and all(v > 0 for v in t.values())
    assert ("bf16" in t) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


BF16_KERNELS = pytest.mark.skipif(not engine.CPU_BF16_LAYOUT, reason="no oneDNN bf16 kernels on this CPU")


def test_bf16_products_round_as_a_bf16_product_must(bf16_products):
    """precision.linear (the loss pass) and, where oneDNN has bf16 kernels, the engine's bf16 copy (decoding):
    each output is a bf16 value, within one bf16 rounding of the exact product of the rounded inputs, handed
    on as float32. A float32 product (the plant) is not bf16-representable and fails the first check."""
    torch.manual_seed(0)
    layer = engine.pack(M.Linear(96, 40, bias=False))
    x = torch.randn(7, 96)
    ref = bf16_reference(x, layer.weight)
    outputs = [layer(x)]  # with gradients: precision.linear
    if engine.CPU_BF16_LAYOUT:
        with torch.no_grad():
            outputs.append(engine.linear(x, layer))
        assert layer.packed.dtype == torch.bfloat16 and outputs[-1] is not None
    for y in outputs:
        assert y.dtype == torch.float32 and torch.equal(y, y.bfloat16().float())
        assert ((y - ref).abs() <= BF16_EPS * ref.abs() + 1e-6).all()  # float32 sums, another order: one ulp
    plant = F.linear(x, layer.weight)
    assert not torch.equal(plant, plant.bfloat16().float())
    outputs[0].sum().backward()  # the gradient reaches the float32 master weight through the cast
    assert layer.weight.grad.dtype == torch.float32
    want = bf16_reference(torch.ones(40, 7), x.T)  # dL/dW = ones[7, 40].T @ x: a bf16 product too
    assert ((layer.weight.grad - want).abs() <= BF16_EPS * want.abs() + 1e-6).all()


@BF16_KERNELS
def test_the_output_layer_and_16bit_weights_keep_their_path(tiny_checkpoints, bf16_products):
    net, _ = M.load_model(tiny_checkpoints["llama"][0])
    assert net.lm_head.packed.dtype == torch.float32  # the logits
    assert all(la.packed.dtype == torch.bfloat16 for la in engine.layers_of(net) if la is not net.lm_head)
    h = torch.randn(3, net.cfg.dim)
    with torch.enable_grad():
        torch.testing.assert_close(net.lm_head(h), F.linear(h, net.lm_head.weight), rtol=0, atol=0)
    half, _ = M.load_model(tiny_checkpoints["llama"][0], dtype=torch.bfloat16)  # bf16 weights: as before
    assert all(la.packed is None for la in engine.layers_of(half))


@pytest.fixture(scope="module")
def smollm2_rollout(smollm2_path):
    """Real SmolLM2, float32 products: a chat prompt and 8 completions sampled at temperature 0.5."""
    net, tok = M.load_model(smollm2_path)
    prompt = tok.chat([{"role": "user", "content": "Caroline adopted a dog named Buddy. What did she adopt?"}])
    comps = generate(net, [prompt] * 8, 16, temperature=0.5, seed=0)
    return net, tok, prompt, comps


@BF16_KERNELS
def test_bf16_log_probs_stay_near_float32_and_near_the_sampler(smollm2_rollout, bf16_products):
    """The loss pass in bf16 against float32 on the same completions, and against the bf16 sampler's own
    log-probs (the training-inference mismatch). The bound: each of the 211 products per token rounds its
    inputs and output by <= 2^-9 relative; SmolLM2's pre-norm residual stream keeps the errors additive, and
    bench/bench_precision.py measured a mean |delta| of ~0.01 nats and a max of ~0.1 on this project's CPUs.
    Bounds at 3x that: mean 0.03, max 0.3, and the PPO ratio at the first update within exp(+-0.3). A bf16
    output layer (logits rounded by up to 0.04 nats each) or bf16 attention would stay inside the mean bound
    too; what these bounds catch is a product in the wrong dtype or at the wrong place (a plant: dropping
    the cast back to float32 in precision.linear sends the max past 1)."""
    net32, _, prompt, comps = smollm2_rollout
    want, mask = losspass.completion_logprobs(net32, prompt, comps, temperature=0.5)
    net = engine.pack(copy.deepcopy(net32))  # bf16 copies (the fixture set bf16 products)
    got, _ = losspass.completion_logprobs(net, prompt, comps, temperature=0.5)
    d = (got - want)[mask].detach()
    assert d.abs().mean() < 0.03 and d.abs().max() < 0.3, (d.abs().mean(), d.abs().max())
    sampled, old = generate(net, [prompt] * 8, 16, temperature=0.5, seed=1, return_logprobs=True)
    new, m = losspass.completion_logprobs(net, prompt, sampled, temperature=0.5)
    old_t = torch.zeros_like(new)
    for r, lp in enumerate(old):
        old_t[r, :len(lp)] = torch.tensor(lp)
    ratio_gap = (new.detach() - old_t)[m]
    assert ratio_gap.abs().mean() < 0.03 and ratio_gap.abs().max() < 0.3, ratio_gap.abs().max()


def test_a_grpo_update_in_bf16_moves_the_loss_like_float32(tiny_checkpoints):
    """Five GRPO updates on one fixed rollout of a tiny model, float32 and bf16 products from the same start:
    the loss falls in both, and bf16's trajectory stays within 10 % of the float32 one's range."""
    def losses(name):
        precision.use(name)
        net, _ = M.load_model(tiny_checkpoints["qwen2"][0])
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        prompt, comps = [5, 6, 7, 8, 9], [[10, 11, 12], [13, 14], [10, 12, 14, 16], [15]]
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(4, 4)
        with torch.no_grad():
            old, mask = losspass.completion_logprobs(net, prompt, comps)
        out = []
        for _ in range(5):
            logp, mask = losspass.completion_logprobs(net, prompt, comps)
            loss, _ = grpo_loss(logp, old, None, adv * mask, mask, 0.0, 0.2, 0.2, "token-mean")
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return torch.tensor(out)

    f32, b16 = losses("float32"), losses("bf16")
    assert f32[-1] < f32[0] - 0.05 and b16[-1] < b16[0] - 0.05, (f32, b16)
    assert (b16 - f32).abs().max() <= 0.1 * (f32.max() - f32.min()), (f32, b16)


def test_the_float32_kernel_does_not_flip_with_timing_noise_and_a_resume_keeps_its_own(monkeypatch):
    """oneDNN's prepacked float32 weights unless F.linear is clearly (PACK_MARGIN) faster: a 10 % difference either
    way, timing noise, keeps the choice; a resumed run's recorded choice wins over the probe (its rounding)."""
    monkeypatch.setattr(precision, "PACK_FLOAT32", True)
    for packed, want in ((1.1, True), (0.9, True), (1.0 * precision.PACK_MARGIN + 0.01, False)):
        precision.use("float32", {"float32": 1.0, "float32_packed": packed})
        assert precision.PACK_FLOAT32 is want, packed
    precision.use("float32", {"float32": 1.0, "float32_packed": 0.5}, pack=False)
    assert precision.PACK_FLOAT32 is False
