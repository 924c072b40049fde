"""The defaults of every setting a user can give, in one place: the CLI flags, ``PlanRequest`` / ``TrainingSetup``
(the library), recipes and the app all read them from here.  The planner's own rule constants (warmup, schedule,
clipping, weight decay) live with their sources in ``recommender/rules.py``.
"""

from __future__ import annotations

#: fine-tuning methods: ``full``, ``lora`` (PEFT adapters on a 16-bit base), ``qlora`` (adapters on an NF4 base)
METHODS = ("full", "lora", "qlora")
#: what ``recommend`` / ``estimate`` / ``fh.recommend`` plan without ``--method``: full fine-tuning, so the answer
#: says whether it fits and, if not, the smallest change that does (LoRA, QLoRA, ...)
METHOD = "full"
#: what a recipe without ``method.type`` trains: it runs what it says, and LoRA fits one GPU for most models
RECIPE_METHOD = "lora"
#: LoRA rank, scale numerator, dropout and target modules (PEFT ``LoraConfig``); dropout 0.05 as QLoRA used for
#: its 7B and 13B models (Dettmers et al. 2023, app. B.2)
LORA_R = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
TARGET_MODULES = "all-linear"
#: learning-rate bounds the planner clamps to (the product's stated range for pre-trained LLMs)
LR_MIN, LR_MAX = 1e-5, 5e-5
#: target effective batch: 64 sequences, as in Llama 2's SFT (Touvron et al. 2023, sec. 3.1)
TARGET_EFFECTIVE_BATCH = 64
EPOCHS = 3.0
#: the learning-rate schedule after warmup, and the ones a plan can use (transformers ``get_scheduler`` types; why
#: each, in recommender/rules.py)
SCHEDULER = "cosine"
SCHEDULES = ("cosine", "linear", "constant_with_warmup", "cosine_with_min_lr", "warmup_stable_decay", "one_cycle",
             "step_decay")
#: how several GPUs share the work: ``auto`` (the fastest predicted of DDP, FSDP, ZeRO-2 and ZeRO-3 that fits), or
#: one forced: ``ddp``, ``fsdp`` (torch FULL_SHARD), ``zero2`` / ``zero3`` (DeepSpeed, when installed)
STRATEGY = "auto"
STRATEGIES = ("auto", "ddp", "fsdp", "zero2", "zero3")
#: DeepSpeed's offload to host memory: ``none``, ``optimizer`` (zero2 / zero3), ``all`` (zero3: parameters too)
OFFLOAD = "none"
OFFLOADS = ("none", "optimizer", "all")
#: the trainer a plan is made for: ``trl`` (TRL's ``SFTTrainer``, what ``finetune-helper run`` executes: its fused,
#: chunked LM head never builds the vocabulary-wide logits) or ``transformers`` (``transformers.Trainer`` with the
#: model's own loss, which builds the full logits and upcasts them to fp32)
TRAINER = "trl"
TRAINERS = ("trl", "transformers")
#: examples assumed when the dataset size is not given
ASSUMED_DATASET_SIZE = 10_000
#: fraction of GPU memory kept free for what the estimate cannot see (other processes, allocator spikes, NCCL)
SAFETY_MARGIN = 0.10
#: the recipes' seed (data order, evaluation split, LoRA init)
SEED = 42
