"""A replica of the runner's training step, for models too large to load: the same step under ``FakeTensorMode``.

The Trainer cannot run on fake tensors (it logs ``loss.item()``), so this module replays what one
``SFTTrainer`` optimizer step does, call for call, on a model built from a config:

* the model as the runner loads it (``TrainingSetup.load_dtype``, attention implementation), TRL's fused LM head
  (``trl.trainer.utils.add_fused_lm_head`` with SFTTrainer's outputs) when the setup's loss path is ``fused``, PEFT
  LoRA on top (``get_peft_model``, PEFT defaults), activation checkpointing as the Trainer enables it
  (``activation_checkpointing_enable``, with ``enable_input_require_grads`` under PEFT, as TRL does);
* the optimizer the Trainer creates (``Trainer.get_optimizer_cls_and_kwargs`` with its decay / no-decay groups);
* per micro-step: the forward under ``torch.autocast`` when the setup computes in bf16 / fp16 (accelerate's
  mixed precision), SFTTrainer's loss (``-log_probs.sum() / tokens``) and metric reductions, ``backward``;
  then ``clip_grad_norm_``, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``.

With real tensors it is checked against :func:`.runner_step.measure_recipe` (the runner's own steps) on tiny
models: both trackers must agree (``tests/measure``); with ``fake=True`` the weights are fake tensors (a storage
size, no data), so a Llama-3.1-8B step is traced on a laptop.  QLoRA (bitsandbytes kernels) cannot be faked.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from .tools import enable_checkpointing, hf_config, torch_dtype

def _fake_parameters(model, mode) -> None:
    """Replace every meta parameter and buffer of ``model`` by a fake CPU tensor of the same shape and dtype."""
    import torch

    device = torch.device("cpu")
    convert = mode.fake_tensor_converter.from_meta_and_device
    done: dict[int, Any] = {}  # tied weights (an embedding shared with the LM head) stay one parameter
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(convert(mode, p, device), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = convert(mode, b, device)


def build_model(config: dict[str, Any], setup, *, fake: bool = False, mode=None, seed: int = 0,
                device: str = "cpu"):
    """The model the runner trains for ``setup`` (see the module docstring), randomly initialised on ``device``;
    ``fake`` needs the ``FakeTensorMode`` the step will run under."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    if setup.method == "qlora":
        raise ValueError("the replica does not build QLoRA (bitsandbytes NF4): measure it with the runner")
    tf_config = hf_config(config)
    torch.manual_seed(seed)
    # fake: everything is built on the meta device (PEFT included), then each meta tensor becomes a fake one
    with torch.device("meta" if fake else device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tf_config, dtype=torch_dtype(setup.load_dtype),
                                                 attn_implementation=setup.attn_implementation)
        model.train()
        if setup.loss == "fused":
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer.__init__
        if setup.gradient_checkpointing:
            enable_checkpointing(model)
        if setup.is_peft:
            from peft import LoraConfig, get_peft_model

            targets = setup.lora_target_modules
            model = get_peft_model(model, LoraConfig(
                r=setup.lora_r, lora_alpha=setup.lora_alpha, lora_dropout=setup.lora_dropout, task_type="CAUSAL_LM",
                target_modules=targets if isinstance(targets, str) else list(targets)))
            if setup.gradient_checkpointing:
                model.enable_input_require_grads()
            model.train()
    if fake:
        _fake_parameters(model, mode)
    return model


def make_batch(setup, vocab_size: int, *, pad_token_id: int = 0, seed: int = 0,
               device: str = "cpu") -> dict[str, Any]:
    """A collated batch of ``setup``'s shape as TRL's collator makes it: ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 on padding); when ``setup.padded``, every row but the first is half as long (without padding
    the all-ones mask is left out, see below).  ``setup.packing``: TRL's padding-free rows, ``position_ids`` that
    restart at each of several examples and no mask."""
    import torch

    b, s = setup.micro_batch_size, setup.seq_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (b, s), generator=g)
    if setup.packing:
        lengths = [s // 4] * 3 + [s - 3 * (s // 4)]  # four examples per row
        positions = torch.cat([torch.arange(n) for n in lengths]).repeat(b, 1)
        batch = {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}
        return {k: v.to(device) for k, v in batch.items()}
    if not (setup.padded and b > 1):
        # an all-ones mask: transformers skips it (SDPA's is_causal) after reading its values, which a fake tensor
        # does not have -- passing none is the same program and keeps the fake trace on it
        return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1:, s // 2:] = 0
    ids = ids.masked_fill(mask == 0, pad_token_id)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {k: v.to(device) for k, v in batch.items()}


def create_optimizer(model, setup, *, learning_rate: float = 1e-5, weight_decay: float = 0.0):
    """The optimizer ``transformers.Trainer.create_optimizer`` makes for ``setup.optim`` (decay / no-decay groups)."""
    import tempfile
    import warnings

    from transformers import Trainer, TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=setup.optim, learning_rate=learning_rate,
                                 weight_decay=weight_decay, use_cpu=setup.device == "cpu", report_to="none")
    decay = set(Trainer.get_decay_parameter_names(None, model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls(groups, **kwargs)


def label_tokens(batches: list[dict[str, Any]]) -> int:
    """Tokens that carry a label over the step's micro-batches (the Trainer's ``num_items_in_batch``)."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def train_step(model, optimizer, batches: list[dict[str, Any]], setup, *, tokens: int,
               max_grad_norm: float = 1.0, phase=lambda name: None) -> None:
    """One optimizer step over ``batches`` (gradient accumulation's micro-batches), as the Trainer runs it;
    ``tokens`` is :func:`label_tokens` of them, counted before (a fake tensor has no values to count)."""
    import torch

    autocast = (torch.autocast(setup.device, dtype=torch_dtype(setup.dtype)) if setup.autocast else nullcontext())
    for batch in batches:
        phase("forward")
        with autocast:
            if setup.loss == "fused":
                out = model(**batch, fused_lm_head=True, use_cache=False)
                loss = (-out.log_probs).sum() / max(tokens, 1)
                # SFTTrainer.compute_loss's metrics: label count, entropy and top-1 sums
                out.label_mask.sum(), out.entropy.detach().sum(), out.is_top1.sum()
            else:
                loss = model(**batch, use_cache=False).loss / len(batches)
        phase("backward")
        loss.backward()
        del loss
    phase("optimizer")
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _as_real_masking(fake: bool):
    """Under fake tensors transformers cannot read mask values, so it builds the causal mask the real program skips
    for an unpadded, unpacked batch (``masking_utils``: ``find_packed_sequence_indices`` and
    ``_ignore_causal_mask_sdpa`` check ``is_tracing``): answer those two questions as the real program does for
    such a batch -- one sequence per row, no padding -- so the fake trace is of the program that really runs
    (SDPA's ``is_causal``, native GQA).  Padded batches pass a mask and are left alone."""
    if not fake:
        return nullcontext()
    from contextlib import ExitStack
    from unittest import mock

    from transformers import masking_utils

    real_skip = masking_utils._ignore_causal_mask_sdpa

    def skip(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if padding_mask is None and (local_attention_size is None or kv_length < local_attention_size) and (
                q_length == 1 or kv_length == q_length):
            return True
        return real_skip(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    stack = ExitStack()
    stack.enter_context(mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *a, **k: None))
    stack.enter_context(mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa", skip))
    return stack


def measure_replica(config: dict[str, Any], setup, *, steps: int = 3, accumulation: int = 1,
                    fake: bool = False) -> list[int]:
    """Each step's peak of live tensor bytes, for the replica of ``setup``'s step (fake tensors when ``fake``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tracker import live_bytes_mode, model_tensors

    if fake and setup.packing:
        raise ValueError("packed rows cannot be traced with fake tensors (transformers reads position_ids' values to "
                         "find the examples); measure them with real tensors")

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    model = build_model(config, setup, fake=fake, mode=mode)
    tracker = live_bytes_mode()
    tracker.register(model_tensors(model), "weights")
    vocab = config["vocab_size"]
    peaks = []
    with mode if fake else nullcontext():
        optimizer = create_optimizer(model, setup)
    for step in range(steps):
        batches = [make_batch(setup, vocab, seed=step * accumulation + i) for i in range(accumulation)]
        tokens = label_tokens(batches)
        with mode if fake else nullcontext(), _as_real_masking(fake), tracker:
            tracker.reset_peak()
            tracker.register([t for b in batches for t in b.values()], "batch")
            train_step(model, optimizer, batches, setup, tokens=tokens, phase=tracker.phase)
            peaks.append(tracker.peak)
    return peaks
