"""``finetune-helper validate``: check a recipe file (and its overrides) without training."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a recipe file (and its overrides) without training")
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..train.recipe import check_references, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    notes = check_references(recipe)
    if recipe.training:
        from ..train.runner import check_training_values

        check_training_values(recipe.training)
    print(f"{args.recipe}: ok ({recipe.model.name}, {recipe.method.type}, data {recipe.data.path}, "
          f"gpu {recipe.hardware.gpu} x {recipe.hardware.gpus})")
    for note in notes:
        print(f"  note: {note}")
