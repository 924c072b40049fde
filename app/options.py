"""The app's command-line options, shared by ``finetune-helper app`` and ``python app/app.py`` (no gradio import)."""

from __future__ import annotations

import argparse
import os

from finetune_helper.errors import FinetuneHelperError

DEFAULT_WORKSPACE = "finetune-workspace"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
