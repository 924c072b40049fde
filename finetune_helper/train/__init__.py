"""Train: a recipe, filled in by the recommender, run with the real Hugging Face stack.

``recipe`` (the YAML recipe as typed dataclasses, overrides, offline checks), ``data`` (loading datasets and
converting them for TRL with answer-only loss), ``runner`` (``finetune-helper run``: the run folder, SFTTrainer,
OOM back-off, divergence stop, resume), ``callbacks`` (progress and guard), ``run_folder`` (the files of a run
folder and its checkpoints), ``tiny`` (the offline tiny base, its pre-training and the synthetic task behind the
demo; ``tiny-base/`` is the shipped base).  torch, transformers, TRL, PEFT and datasets are imported inside the
functions that need them.
"""
