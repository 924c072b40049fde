"""``finetune-helper models``: the model catalog."""

from __future__ import annotations

import argparse
import json

from ..units import fmt_count
from .common import emit, table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="the model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..recommender.catalog import model_entries
    from ..recommender.model import ModelSpec

    rows, data = [], []
    for e in model_entries():
        spec = ModelSpec.from_config(e["config"], name=e["id"])
        data.append({"id": e["id"], "aliases": e.get("aliases", []), "model_type": spec.model_type,
                     "parameters": spec.num_parameters(), "max_position_embeddings": spec.max_position_embeddings,
                     "source": e.get("source")})
        rows.append([e["id"], spec.model_type, fmt_count(spec.num_parameters()), spec.num_hidden_layers,
                     spec.hidden_size, spec.max_position_embeddings, ", ".join(e.get("aliases", [])[:2])])
    if args.json:
        emit(args, json.dumps(data, indent=2))
    else:
        print(table(rows, ["model", "type", "params", "layers", "hidden", "max seq", "aliases"]))
