"""Shared tiny fixtures (config dicts small enough to build real models in milliseconds on CPU) and the test tiers.

Tiers (make targets, all run by ``make test``): unit (no mark: pure Python, no torch / transformers / gradio import;
``make test-unit`` fails the session if one was imported), integration (``pytest.mark.integration``: real CPU
training, measurements against torch, launcher processes, the app server), browser (``pytest.mark.browser``).
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

#: libraries the unit tier must not import (what makes a test "pure Python" here)
HEAVY = ("torch", "transformers", "gradio", "datasets", "trl", "peft", "accelerate", "bitsandbytes")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# probes store calibrations: never in the user's own store
os.environ["FINETUNE_HELPER_CALIBRATION"] = os.path.join(tempfile.mkdtemp(prefix="fh-test-calibration-"),
                                                         "calibration.json")

#: the architectures counted exactly without torch (finetune_helper/architectures.py)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def tiny_config(model_type: str, **overrides) -> dict:
    """A random-init-sized config.json dict of ``model_type`` (vocab 512, hidden 64, 2 layers, GQA 4/2 heads)."""
    cfg = {
        "model_type": model_type, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


#: ``python -c HEAVY_CHECK ARGS...``: the command as its entry point runs it (its exit code kept), then on its last
#: stderr line which of the training stack's packages it had imported (``HEAVY []`` when none)
HEAVY_CHECK = """
import sys, runpy
sys.argv, code = ["finetune-helper", *sys.argv[1:]], 0
try:
    runpy.run_module("finetune_helper", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
print("HEAVY", sorted(m for m in heavy if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""

@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def _tier_marked(path) -> bool:
    """The module declares itself integration or browser (read, not imported: importing would load torch)."""
    text = path.read_text(encoding="utf-8")
    return "pytestmark = pytest.mark.integration" in text or "pytest.mark.browser" in text


def pytest_ignore_collect(collection_path, config):
    """The unit tier does not even import the integration and browser modules (nor tests/app, whose conftest
    starts app servers)."""
    if os.environ.get("FH_TIER") != "unit":
        return None
    if collection_path.is_dir() and collection_path.name == "app":
        return True
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_") and _tier_marked(collection_path):
        return True
    return None


def pytest_sessionfinish(session, exitstatus):
    """``FH_TIER=unit`` (make test-unit): the session fails if a test imported a heavy library."""
    if os.environ.get("FH_TIER") != "unit":
        return
    imported = sorted(m for m in HEAVY if m in sys.modules)
    if imported:
        print(f"\nunit tier imported {imported}: mark the test that needs them pytest.mark.integration",
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
