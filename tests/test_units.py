from __future__ import annotations

import pytest

from finetune_helper.errors import FinetuneHelperError
from finetune_helper.units import GiB, fmt_count, fmt_gib, looks_like_amount, parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("24GB", 24 * 10**9), ("24 GB", 24 * 10**9), ("80GiB", 80 * 2**30), ("80gib", 80 * 2**30),
    ("16384MiB", 16 * 2**30), ("1.5TB", 1.5e12), ("0.5GiB", 2**29),
])
def test_parse_bytes_is_explicit_about_units(text, expected):
    assert parse_bytes(text) == int(expected)


def test_gb_and_gib_differ():
    assert parse_bytes("80GiB") - parse_bytes("80GB") == 80 * (2**30 - 10**9)


@pytest.mark.parametrize("text", ["24", "abc", "-3GB", "0GB", "12 parsecs", ""])
def test_parse_bytes_rejects(text):
    with pytest.raises(FinetuneHelperError) as err:
        parse_bytes(text, field="gpu")
    assert err.value.field == "gpu"


def test_formatting():
    assert fmt_gib(3 * GiB) == "3.00 GiB"
    assert fmt_count(8_030_261_248) == "8.03B"
    assert fmt_count(494_032_768) == "494M"
    assert looks_like_amount("24GB") and not looks_like_amount("H100") and not looks_like_amount("24")
