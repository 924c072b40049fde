"""finetune_helper.export.versions: the supported stack comes from the package's own requirements and is enforced."""

from __future__ import annotations

import importlib.metadata

import pytest

from finetune_helper.errors import FinetuneHelperError
from finetune_helper.export.versions import CHECKED, check_stack, installed_stack, supported_ranges

INSTALLED = installed_stack()


def test_ranges_are_those_of_pyproject():
    ranges = supported_ranges()
    assert set(ranges) == set(CHECKED)
    requires = importlib.metadata.requires("finetune-helper")
    assert any(r.replace(" ", "").startswith("transformers") and "<6" in r for r in requires)
    assert "<6" in ranges["transformers"] and ">=5" in ranges["transformers"]


def test_the_installed_stack_is_supported():
    assert check_stack() == []
    assert all(INSTALLED[name] for name in CHECKED)


def test_newer_major_warns_and_older_refuses():
    newer = dict(INSTALLED, transformers="6.0.1")
    (warning,) = check_stack(newer)
    assert "transformers 6.0.1 is newer than the tested range" in warning
    with pytest.raises(FinetuneHelperError, match="transformers 4.46.1 is installed; the runner needs") as info:
        check_stack(dict(INSTALLED, transformers="4.46.1"))
    assert info.value.field == "stack"
    with pytest.raises(FinetuneHelperError, match="trl is not installed"):
        check_stack(dict(INSTALLED, trl=None))
    assert check_stack(dict(INSTALLED, torch="2.13.0+cu128", trl="1.17.0rc1")) == []
