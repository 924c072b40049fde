"""``finetune-helper validate``: every check ``run`` makes before it loads weights, without writing anything."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a recipe (and its overrides) as run would, short of loading "
                              "weights: fields, names, the model's modules, the data, the plan, the TrainingArguments")
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..train.recipe import check_references, load_recipe
    from ..train.runner import check_training_values, prepare

    recipe = load_recipe(args.recipe, args.overrides)
    notes = check_references(recipe)
    check_training_values(recipe.training)  # the recipe's own values first, then everything the run derives
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="finetune-helper-validate-") as scratch:  # prepare writes nothing there
        prep, _ = prepare(recipe, Path(scratch) / "run", log.append, check_only=True)
    found = [line.removeprefix("note: ") for line in log if line.startswith(("note:", "warning:"))]
    if any(line.startswith("data.path") for line in found):  # the run's own note on the data says more
        notes = [note for note in notes if not note.startswith("data.path")]
    notes += found
    check_machine(recipe)
    plan = prep.plan
    print(f"{args.recipe}: ok ({recipe.model.name}, {recipe.method.type}, data {recipe.data.path}, "
          f"gpu {recipe.hardware.gpu} x {recipe.hardware.gpus}; plan: batch {plan.per_device_train_batch_size} x "
          f"accumulation {plan.gradient_accumulation_steps}, lr {plan.learning_rate:.2e}, "
          f"{'fits' if plan.fits else 'DOES NOT FIT'})")
    for note in notes:
        print(f"  note: {note}")


def check_machine(recipe) -> None:
    """What ``run`` refuses on this machine whatever the recipe's other values (``commands.run.dispatch``, before
    any process starts): DeepSpeed without CUDA GPUs, with the same one-line error.  Checked after everything
    else, so that a recipe for a GPU node validated on a laptop has passed every other check when it is refused
    here (``run --dry-run`` still plans it)."""
    from ..train.preflight import check_deepspeed, deepspeed_field

    if field := deepspeed_field(recipe):
        check_deepspeed(field)
