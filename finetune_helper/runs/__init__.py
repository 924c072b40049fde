"""Runs: what the app drives. ``workspace`` confines typed paths and keeps uploads; ``manager`` starts each run as
its own ``finetune-helper run`` process and reads its state back from the run folder (status, stop, resume, list).
No gradio here: the app (``app/``) is a thin front end over this package, ``train`` and ``export``."""
