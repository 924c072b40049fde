"""Measure an export the way a user runs it: the plan's text read back as a user's script reads it
(``HfArgumentParser`` for JSON / YAML / CLI flags, the Python snippet executed), the model loaded as the export says
(``model_init_kwargs`` for ``SFTTrainer(model=<name>)``, the snippet's ``load_model()``, or the dtype its header
names), and a few real optimizer steps with the trainer the export is written for -- TRL's ``SFTTrainer`` on plain
text, or ``transformers.Trainer`` with the model's own loss on text tokenized to ``max_length`` -- under the
live-tensor tracker (:mod:`.tracker`).  Nothing here reads the estimate: it measures, the estimator predicts.
"""

from __future__ import annotations

import dataclasses
import random
import re
import shlex
from pathlib import Path
from typing import Any

#: what :func:`text_rows` generates: every other row longer than any max_length here (truncated to it), the others
#: short, so that every batch of two rows or more is padded (an attention mask), the plan's worst case
LONG_ROW, SHORT_ROWS = 200, (5, 20)


def text_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` plain-text rows of digits (one token each in the tiny tokenizer), alternately long and short."""
    rng = random.Random(seed)
    return [{"text": " ".join(str(rng.randrange(10)) for _ in range(LONG_ROW if i % 2 else rng.randrange(*SHORT_ROWS)))}
            for i in range(n)]


def load_exported(plan, fmt: str, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """The arguments ``fmt`` exports for ``plan``, as a user's script reads them (an instance of the plan's
    arguments class), and the snippet's namespace (``load_model``, ``lora_config``; empty for the other formats)."""
    from transformers import HfArgumentParser

    from ..export.formats import render
    from ..export.training_args import arguments_class

    cls = arguments_class(plan)
    workdir.mkdir(parents=True, exist_ok=True)
    text = render(plan, fmt, str(workdir / "out"))
    namespace: dict[str, Any] = {}
    if fmt in ("json", "yaml"):
        path = workdir / f"args.{fmt}"
        path.write_text(text)
        parser = HfArgumentParser(cls)
        (args,) = parser.parse_json_file(str(path)) if fmt == "json" else parser.parse_yaml_file(str(path))
    elif fmt == "cli":
        (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(args=shlex.split(text))
    elif fmt == "python":
        exec(compile(text, str(workdir / "args.py"), "exec"), namespace)  # noqa: S102 - the user runs the snippet
        args = namespace["args"]
    else:
        raise ValueError(f"{fmt} exports no arguments")
    return args, namespace


def header_dtype(plan) -> str:
    """The dtype the export's header tells the user to load the model in (``float32``, ``bfloat16``...)."""
    from ..export.formats import header

    (line,) = [line for line in header(plan) if line.startswith("load the model")]
    return re.search(r"dtype=torch\.(\w+)", line).group(1)


def _lora(plan, namespace: dict[str, Any]):
    """The snippet's ``lora_config()``, else the LoRA settings the header states, as a user writes them."""
    if "lora_config" in namespace:
        return namespace["lora_config"]()
    if plan.request.method == "full":
        return None
    from peft import LoraConfig

    r = plan.request
    targets = r.lora_target_modules if isinstance(r.lora_target_modules, str) else list(r.lora_target_modules)
    return LoraConfig(r=r.lora_r, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def train_exported(plan, args, namespace: dict[str, Any], model_path: str, rows: list[dict[str, str]], *,
                   workdir: Path, steps: int = 2) -> int:
    """``steps`` optimizer steps of ``model_path`` on ``rows`` with the export's trainer and arguments (its length,
    saving and logging set for a short run); returns the tracked peak of live tensor bytes over them."""
    import torch
    from datasets import Dataset

    from .tracker import live_bytes_mode, model_tensors

    args = dataclasses.replace(args, output_dir=str(workdir / "run"), max_steps=steps, save_strategy="no",
                               logging_steps=1, report_to="none", disable_tqdm=True)
    data = Dataset.from_list(rows)
    lora = _lora(plan, namespace)
    torch.manual_seed(0)
    if plan.request.trainer == "trl":
        from trl import SFTTrainer

        # the model by name: SFTTrainer loads it from the arguments' model_init_kwargs
        trainer = SFTTrainer(model=model_path, args=args, train_dataset=data, peft_config=lora)
    else:
        trainer = _transformers_trainer(plan, args, namespace, model_path, data, lora)
    mode = live_bytes_mode()
    mode.register(model_tensors(trainer.model), "weights")
    with mode:
        trainer.train()
    if trainer.state.global_step != steps:
        raise RuntimeError(f"trained {trainer.state.global_step} steps, not {steps}")
    return mode.peak


def _transformers_trainer(plan, args, namespace: dict[str, Any], model_path: str, data, lora):
    """A user's ``transformers.Trainer`` script: the model loaded as the export says, PEFT applied, the text
    tokenized to ``max_length`` (the plan's sequence length) and padded by the language-modelling collator."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    if "load_model" in namespace:
        model = namespace["load_model"]()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, header_dtype(plan)))
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    length = plan.request.resolved_seq_len
    tokens = data.map(lambda row: tokenizer(row["text"], truncation=True, max_length=length),
                      remove_columns=["text"])
    return Trainer(model=model, args=args, train_dataset=tokens,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
