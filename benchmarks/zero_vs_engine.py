"""DeepSpeed ZeRO's model states per rank: the real engine (deepspeed.initialize + 2 steps, 2 ranks on the CPU with
gloo, bf16, the Trainer's bucket sizes; finetune_helper/measure/zero_states.py) against the estimate
(recommender/zero.py) and DeepSpeed's own estimator, in bytes per parameter.

    .venv/bin/python benchmarks/zero_vs_engine.py          # 5 cases, about 80 s

"after step" is what stays between steps (device side of the offload); the 32-bit gradients exist during the step
only (ZeRO-3 also keeps a 16-bit gradient partition). "peak" is the whole step's, which on the CPU includes
torch AdamW's partition-sized temporaries (CUDA's fused AdamW makes none; DeepSpeed's CPU Adam neither).
"""

from __future__ import annotations

SMALL = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
CASES = [("zero2", "none"), ("zero3", "none"), ("zero2", "optimizer"), ("zero3", "optimizer"), ("zero3", "all")]


def main() -> None:
    from finetune_helper.measure.zero_states import measure
    from finetune_helper.recommender.model import ModelSpec
    from finetune_helper.recommender.zero import GRAD_16, zero_states

    spec = ModelSpec.from_config(SMALL)
    n = spec.num_parameters()
    print(f"Llama, {n:,} parameters, 2 ranks; bytes per parameter per rank")
    print(f"{'case':22s} {'engine after step':>17s} {'estimate':>9s} {'diff':>7s} {'engine host':>11s} "
          f"{'estimate host':>13s} {'engine peak':>11s} {'DeepSpeed gpu':>13s}")
    worst = 0.0
    for strategy, offload in CASES:
        result = measure(SMALL, stage=int(strategy[-1]), offload=offload, processes=2)
        ours = zero_states(spec, strategy=strategy, offload=offload, gpus=2, trainable=n, frozen_bytes=0)
        staying = ours.weights + ours.optimizer_states + (GRAD_16 * n // 2 if strategy == "zero3" and
                                                           offload == "none" else 0)
        for rank in result["ranks"]:
            after = rank["moments"]["after_step"]
            measured = after["device"] if offload != "none" else after["live"]
            diff = (staying - measured) / n
            worst = max(worst, abs(diff))
            print(f"{strategy + ' / ' + offload:22s} {measured / n:17.3f} {staying / n:9.3f} {diff:+7.3f} "
                  f"{after.get('host', 0) / n:11.3f} {ours.host / 2 / n:13.3f} {rank['peak'] / n:11.2f} "
                  f"{rank['deepspeed_formula']['gpu'] / n:13.3f}")
    print(f"\nworst |estimate - engine| of the states that stay: {worst:.3f} bytes per parameter (ZeRO-3's reduce "
          "bucket of hidden^2 16-bit values and its whole norm weights, not in the estimate); estimate host: "
          "DeepSpeed's per-node figure / 2 ranks")


if __name__ == "__main__":
    main()
