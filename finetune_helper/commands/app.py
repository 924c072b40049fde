"""``finetune-helper app``: the Gradio app (recommend, export, start / watch / stop runs), and its options.

The options live here, with no gradio import, so that ``finetune-helper --help`` stays fast; ``python app/app.py``
uses the same :func:`add_arguments`.  The app itself (``app/``, installed as ``finetune_helper_app``) plugs in
through the ``finetune_helper.app`` entry point: nothing in ``finetune_helper`` imports it.
"""

from __future__ import annotations

import argparse
import os

from ..errors import FinetuneHelperError

DEFAULT_WORKSPACE = "finetune-workspace"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: the entry-point group the app registers its ``launch(args)`` under (pyproject.toml)
ENTRY_POINT_GROUP = "finetune_helper.app"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise FinetuneHelperError("auth", "must be user:password (both non-empty)")
    return user, password


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                        "machine only; 0.0.0.0 exposes the app: use --auth)")
    parser.add_argument("--port", type=int, default=7860, help="default: %(default)s")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--workspace", default=os.environ.get("FINETUNE_HELPER_WORKSPACE", DEFAULT_WORKSPACE),
                        help="folder for uploads, runs and exports; paths typed into the app must be inside it "
                        "(default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("app", help="the Gradio app: recommend, export, start / watch / stop runs")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if not found:
        raise FinetuneHelperError("app", "the app is not installed (pip install -e . from the repository installs "
                                  "it as finetune_helper_app)")
    found[0].load()(args)
