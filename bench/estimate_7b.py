"""Memory and hours of a Qwen-2.5-7B GRPO run on the paper's settings, on 1 and on 4 GPUs: an estimate.

    python bench/estimate_7b.py                       # H100 80 GB, the paper's batch, LoRA rank 16
    python bench/estimate_7b.py --response 512 --mfu 0.3
    python bench/estimate_7b.py --smoke               # the same as the default (the test suite runs it)

Nothing here is measured on a GPU (none was lent to this project's sessions): parameter and KV-cache
sizes come from Qwen2.5-7B-Instruct's config.json; per-token costs are the standard FLOP counts of a
decoder (2 N per token forward, 4 N backward, 2 N more for the activation-checkpoint recompute, plus
attention); time = FLOPs / (peak x MFU) for prefill and the loss pass, and weight + KV bytes / HBM
bandwidth per decoding step (decoding is memory-bound). MFU, mean lengths and G are assumptions, set
by flags. bench/bench_loss_pass.py and bench/bench_scale.py give the measured CPU counterparts.
"""

import argparse

# Qwen/Qwen2.5-7B-Instruct config.json
V, D, L, H, HKV, HD, FFN = 152064, 3584, 28, 28, 4, 128, 18944
GIB = 2**30


def params() -> dict:
    attn = D * H * HD * 2 + D * HKV * HD * 2 + (H + 2 * HKV) * HD  # q, o, k, v weights + q/k/v biases
    block = attn + 3 * D * FFN + 2 * D  # + SwiGLU MLP + two RMSNorms
    return {"embed": V * D, "lm_head": V * D, "blocks": L * block, "total": 2 * V * D + L * block + D}


def lora_params(rank: int) -> int:
    shapes = [(D, H * HD), (D, HKV * HD), (D, HKV * HD), (H * HD, D), (D, FFN), (D, FFN), (FFN, D)]
    return L * sum(rank * (i + o) for i, o in shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--questions", type=int, default=128, help="prompts per step (paper: global batch 128)")
    a("--group", type=int, default=8, help="G completions per prompt (paper: not reported; 8 is common)")
    a("--prompt", type=int, default=3500, help="mean prompt tokens (60 memories + question; paper max 4096)")
    a("--response", type=int, default=256, help="mean response tokens (paper max 2048)")
    a("--steps", type=int, default=50, help="optimizer steps (train.py's paper preset)")
    a("--lora-rank", type=int, default=16, help="LoRA rank on all seven projections")
    a("--smoke", action="store_true", help="accepted for uniformity with the other benchmarks: this script is "
      "arithmetic, so its default run is already its smallest")
    a("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    a("--mfu", type=float, default=0.35, help="achieved share of peak in prefill and the loss pass (assumed)")
    a("--hbm-tbps", type=float, default=3.35, help="memory bandwidth per GPU, TB/s (H100 SXM: 3.35)")
    a("--rollout-batch", type=int, default=4, help="questions per generate call (x G sequences decode together)")
    a("--micro-batch", type=int, default=8, help="completions per loss-pass chunk (8: the whole group)")
    a("--usable-gib", type=float, default=78.0, help="GPU memory a process can use (H100 80 GB: ~78 GiB)")
    args = ap.parse_args()

    p = params()
    N, n_lora = p["total"], lora_params(args.lora_rank)
    kv_per_token = 2 * L * HKV * HD * 2  # k and v, bf16
    # --- memory per GPU (bytes) ---
    weights = 2 * N  # bf16
    full_states = 2 * N + 2 * 2 * N  # bf16 grads + AdamW's two moments in the weights' dtype (--dtype bfloat16)
    lora_states = n_lora * (4 + 4 + 8)  # float32 adapters, grads, two moments
    seqs = args.rollout_batch * args.group
    # each distinct prompt once (a segment its group's rows share: sampling.prefill), each row its own response
    kv = (args.rollout_batch * args.prompt + seqs * args.response) * kv_per_token
    chunk_tokens = args.prompt + args.micro_batch * args.response
    checkpointed = L * chunk_tokens * D * 2  # each block's input kept for backward
    block_work = chunk_tokens * (4 * D + 3 * FFN) * 2 * 2  # one block recomputed: q/k/v/o + MLP, with grads
    logits = args.micro_batch * args.response * V * 4 * 2  # float32 log-softmax and its gradient
    act = checkpointed + block_work + logits
    rows = []
    for name, gpus, model_mem in [
        ("full, DDP", 1, weights + full_states + weights),  # policy, its grads and AdamW, the reference
        ("full, DDP", 4, weights + full_states + weights),  # DDP replicates everything
        ("full, FSDP2", 4, (weights + full_states + weights) / 4),  # sharded policy, optimizer and reference
        ("LoRA", 1, weights + lora_states),  # the base, adapters off, is the reference
        ("LoRA", 4, weights + lora_states),
    ]:
        rows.append((name, gpus, model_mem, model_mem + max(kv, act)))

    # --- time per step ---
    flops_fwd = 2 * N  # per token, plus attention below
    attn = 2 * 2 * L * H * HD * (args.prompt + args.response / 2)  # QK^T and AV per new token, mean context
    prefill = args.questions * args.prompt * (flops_fwd + attn / 2)
    loss_tokens = args.questions * (args.prompt + args.group * args.response)
    chunks = -(-args.group // args.micro_batch)
    loss_tokens_recomputed = args.questions * (chunks * args.prompt + args.group * args.response)
    train_flops = loss_tokens_recomputed * 8 * (flops_fwd + attn) / 2 + loss_tokens * (flops_fwd + attn)  # + ref
    decode_calls = args.questions / args.rollout_batch
    decode_step_bytes = weights + (args.rollout_batch * args.prompt + seqs * args.response / 2) * kv_per_token
    decode_s = decode_calls * args.response * decode_step_bytes / (args.hbm_tbps * 1e12)
    compute_s = (prefill + train_flops) / (args.peak_tflops * 1e12 * args.mfu)

    print(f"Qwen2.5-7B: {N / 1e9:.2f} B parameters; LoRA r={args.lora_rank} on 7 projections: "
          f"{n_lora / 1e6:.1f} M; KV cache {kv_per_token / 1024:.0f} KiB per token")
    print(f"step: {args.questions} prompts x G={args.group}, prompt {args.prompt}, response {args.response} tokens; "
          f"loss pass in chunks of {args.micro_batch} completions\n")
    print(f"{'setup':<13}{'GPUs':>5}{'weights+optim GiB':>19}{'peak GiB/GPU':>14}{'headroom GiB':>14}{'h/run':>8}")
    for name, gpus, model_mem, peak in rows:
        hours = args.steps * (decode_s + compute_s) / gpus / 3600
        print(f"{name:<13}{gpus:>5}{model_mem / GIB:>19.1f}{peak / GIB:>14.1f}{args.usable_gib - peak / GIB:>14.1f}"
              f"{hours:>8.1f}")
    print(f"\nper step on one GPU: decoding {decode_s:.0f} s (memory-bound: {decode_step_bytes / GIB:.1f} GiB read per "
          f"token step), prefill + loss pass + reference {compute_s:.0f} s at {args.mfu:.0%} MFU; "
          f"activations {act / GIB:.1f} GiB, rollout KV cache {kv / GIB:.1f} GiB")
    print("LoRA's time per step is taken as full fine-tuning's: the frozen base still runs forward and backward "
          "(for the input gradients); only the optimizer work shrinks.")


if __name__ == "__main__":
    main()
