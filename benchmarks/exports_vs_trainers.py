"""Each export, used as a user uses it, against the peak it was planned at: the tracked peak of real optimizer steps
with the trainer the export is written for, on the CPU.

For two models (the shipped tiny base, vocabulary 512, and a random-init Llama with a 16384-token vocabulary, where
the logits path dominates), three setups (full fine-tuning, full with gradient checkpointing, LoRA), both trainers
(``--trainer trl``: TRL's ``SFTTrainer`` loading the model by name from ``model_init_kwargs``; ``--trainer
transformers``: ``transformers.Trainer`` with the model's own loss) and the four argument formats (JSON, YAML, CLI
flags read with ``HfArgumentParser``; the Python snippet executed): the plan made with ``--device cpu``, its
export read back and trained for 2 steps (``finetune_helper.measure.exported``), the tracked peak of live tensor
bytes against the plan's ``allocated_peak``.  The test (tests/export/test_trainer_exports.py) asserts 5% on the
tiny base.

    .venv/bin/python benchmarks/exports_vs_trainers.py          # 48 short trainings, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "finetune_helper" / "train" / "tiny-base"
SEQ, BATCH, ROWS = 64, 8, 32
#: name -> (method, forced gradient checkpointing)
SETUPS = {"full": ("full", False), "full-gc": ("full", True), "lora": ("lora", False)}
FORMATS = ("json", "yaml", "python", "cli")


def wide_vocab_model(root: Path) -> Path:
    """A random-init Llama (2 layers, hidden 64) with a 16384-token vocabulary and the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = root / "wide-vocab"
    config = LlamaConfig(vocab_size=16384, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import finetune_helper as fh
    from finetune_helper.measure.exported import load_exported, text_rows, train_exported

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="exports-vs-trainers-"))
    errors = []
    try:
        models = {"tiny-base": TINY, "wide-vocab": wide_vocab_model(tmp)}
        print(f"{'model':10} {'setup':8} {'trainer':12} {'format':6} {'planned MiB':>11} {'tracked MiB':>11} "
              f"{'error':>7}", flush=True)
        for model_name, path in models.items():
            for setup, (method, gc) in SETUPS.items():
                for trainer in ("trl", "transformers"):
                    plan = fh.recommend(str(path), gpu="16GiB", method=method, seq_len=SEQ,
                                        target_effective_batch=BATCH, dataset_size=800, epochs=1.0, device="cpu",
                                        trainer=trainer, lr_max=1e-3, gradient_checkpointing=gc or None)
                    planned = plan.estimate.allocated_peak
                    for fmt in args.formats:
                        work = tmp / model_name / setup / trainer / fmt
                        loaded, namespace = load_exported(plan, fmt, work)
                        tracked = train_exported(plan, loaded, namespace, str(path), text_rows(ROWS), workdir=work)
                        err = (planned - tracked) / tracked
                        errors.append((abs(err), f"{model_name}/{setup}/{trainer}/{fmt}", err))
                        print(f"{model_name:10} {setup:8} {trainer:12} {fmt:6} {planned / 2**20:11.2f} "
                              f"{tracked / 2**20:11.2f} {err:+7.1%}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    worst = max(errors)
    print(f"\n{len(errors)} trainings; worst error {worst[2]:+.1%} ({worst[1]}); mean |error| "
          f"{sum(e[0] for e in errors) / len(errors):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
