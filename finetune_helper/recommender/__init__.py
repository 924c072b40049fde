"""Recommend: from a model's config and a GPU to a memory estimate and a training plan, with a reason per value.

Pure Python (PyYAML for the catalogs; no torch, transformers, datasets, TRL or gradio at import time: a test holds
it), so ``finetune-helper recommend`` answers in a fraction of a second.  The data flows spec -> setup -> estimate
-> plan:

* ``model`` (:class:`ModelSpec`, exact parameter counts, ``--model`` resolution), ``architectures`` (what differs
  between llama / qwen / gemma / phi, as data), ``gpu`` (:class:`GPUSpec`, ``--gpu`` resolution), ``catalog`` with
  ``data/*.yaml`` (models, GPUs and learning-rate references, each citing its source);
* ``training_setup`` (:class:`TrainingSetup`: how one step is run) and ``optimizers`` (state facts per optimizer);
* ``activations`` and ``memory`` (the peak-memory estimate, part by part);
* ``rules`` (learning rate, warmup: the scaling rules and their sources), ``plan`` (:func:`recommend_plan`) and
  ``schedule`` (the learning rate at every step, as the Trainer schedules it).
"""
