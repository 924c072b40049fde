"""Export: a plan as the installed transformers' ``TrainingArguments`` and as files that rebuild them.

``versions`` (what the installed stack is and supports: ``TrainingArguments`` fields read from its source, renames
between transformers 4 and 5, the supported range of the training stack), ``training_args`` (the plan as keyword
arguments and as a real ``TrainingArguments``), ``formats`` (JSON / YAML / Python / CLI flags).  Imports
transformers only to build a real ``TrainingArguments``; depends on ``recommend`` and nothing above it.
"""
