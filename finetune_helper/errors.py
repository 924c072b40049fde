"""The one error type the core raises for bad input.

Front ends map it: the CLI prints ``error: <field>: <message>`` and exits 2, the app shows it.
"""

from __future__ import annotations


class FinetuneHelperError(ValueError):
    """Bad input, named by the field (CLI flag or setting) it came from."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error in a one-line report), or its type's
    name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
