"""What the sharding engines really hold per rank for the model states, against the estimate, in bytes per
parameter: torch FSDP2 (``fully_shard`` per decoder layer, accelerate's layout and bf16 mixed precision;
finetune_helper/measure/fsdp_states.py) and DeepSpeed ZeRO-2 / ZeRO-3 with and without offload (deepspeed.initialize;
finetune_helper/measure/zero_states.py), 2 ranks on the CPU with gloo, a 3.4M-parameter Llama, 2 steps, live tensor
bytes of the last one (the project's TorchDispatchMode tracker, cross-checked byte for byte against gc).

    .venv/bin/python benchmarks/sharded_vs_engine.py          # about 60 s

"between steps" is what stays (the GPU side of an offload): FSDP's fp32 shards and AdamW states; ZeRO's 16-bit
parameters, master partition and moments (ZeRO-3: its 16-bit gradient partition too). "after backward" adds the
gradients (FSDP: fp32 shards). "peak" is the whole step's, with the engines' communication buffers and, on the CPU,
torch AdamW's temporaries (CUDA's fused AdamW makes none).
"""

from __future__ import annotations

SMALL = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
ZERO = [("zero2", "none"), ("zero3", "none"), ("zero2", "optimizer"), ("zero3", "optimizer"), ("zero3", "all")]


Row = tuple  # (engine, between steps, estimate, after backward, estimate or None, peak, host, host estimate,
#              DeepSpeed's gpu figure), bytes per parameter; None where a column does not apply


def fsdp_row(spec, n: int) -> Row:
    from finetune_helper.measure.fsdp_states import measure
    from finetune_helper.recommender.memory import estimate_memory
    from finetune_helper.recommender.training_setup import TrainingSetup

    rank = measure(SMALL, mixed_precision="bf16-accelerate", wrap="accelerate", processes=2)["ranks"][0]
    est = estimate_memory(spec, TrainingSetup(method="full", micro_batch_size=1, seq_len=32), gpus=2,
                          sharding="fsdp")
    staying = est.weights + est.optimizer_states
    with_grads = staying + est.details["gradients.all"]
    moments = rank["moments"]  # between steps: after the Trainer's zero_grad
    return ("fsdp", moments["after_zero_grad"]["live"] / n, staying / n, moments["after_backward"]["live"] / n,
            with_grads / n, rank["peak"] / n, None, None, None)


def zero_rows(spec, n: int) -> list[Row]:
    from finetune_helper.measure.zero_states import measure
    from finetune_helper.recommender.zero import GRAD_16, zero_states

    rows = []
    for strategy, offload in ZERO:
        rank = measure(SMALL, stage=int(strategy[-1]), offload=offload, processes=2)["ranks"][0]
        ours = zero_states(spec, strategy=strategy, offload=offload, gpus=2, trainable=n, frozen_bytes=0)
        staying = ours.weights + ours.optimizer_states + (GRAD_16 * n // 2 if strategy == "zero3" and
                                                           offload == "none" else 0)
        after = rank["moments"]["after_step"]
        side = "device" if offload != "none" else "live"
        rows.append((f"{strategy} / offload {offload}", after[side] / n, staying / n,
                     rank["moments"]["after_backward"][side] / n, None, rank["peak"] / n,
                     after.get("host", 0) / n, ours.host / 2 / n, rank["deepspeed_formula"]["gpu"] / n))
    return rows


def main() -> None:
    from finetune_helper.recommender.model import ModelSpec

    spec = ModelSpec.from_config(SMALL)
    n = spec.num_parameters()
    rows = [fsdp_row(spec, n), *zero_rows(spec, n)]
    print(f"Llama, {n:,} parameters, 2 ranks (rank 0); bytes per parameter")
    print(f"{'engine':24s} {'between steps':>13s} {'estimate':>9s} {'after backward':>14s} {'estimate':>9s} "
          f"{'peak':>6s} {'host':>6s} {'estimate':>9s} {'DeepSpeed gpu':>13s}")
    worst = 0.0
    for name, kept, est_kept, back, *rest in rows:
        worst = max(worst, abs(kept - est_kept))
        cells = ["-" if v is None else f"{v:.3f}" for v in rest]
        print(f"{name:24s} {kept:13.3f} {est_kept:9.3f} {back:14.3f} {cells[0]:>9s} {cells[1]:>6s} {cells[2]:>6s} "
              f"{cells[3]:>9s} {cells[4]:>13s}")
    print(f"\nworst |estimate - engine| between steps: {worst:.3f} bytes per parameter (ZeRO-3's reduce bucket of "
          "hidden^2 16-bit values and its whole norm weights are not in the estimate); host estimate: DeepSpeed's "
          "per-node figure (1.5x buffer) / 2 ranks")


if __name__ == "__main__":
    main()
