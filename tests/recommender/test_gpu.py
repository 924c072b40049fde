from __future__ import annotations

import pytest

from finetune_helper.recommender import catalog
from finetune_helper.errors import FinetuneHelperError
from finetune_helper.recommender.gpu import resolve_gpu
from finetune_helper.units import GiB, MiB

ENTRIES = catalog.gpu_entries()


def test_catalog_size_and_fields():
    assert len(ENTRIES) >= 25
    names = [e["name"] for e in ENTRIES]
    assert len(set(names)) == len(names)
    for e in ENTRIES:
        assert e["memory_mib"] > 1000 and isinstance(e["bf16"], bool), e["name"]
        assert e["source"].startswith("https://"), e["name"]
        assert (e.get("bf16_tflops") or e.get("fp16_tflops") or 0) > 0, e["name"]


def test_aliases_do_not_collide():
    seen: dict[str, str] = {}
    for e in ENTRIES:
        for name in [e["name"], *e.get("aliases", [])]:
            key = catalog.normalize(name)
            assert seen.setdefault(key, e["name"]) == e["name"], f"{name} names {seen[key]} and {e['name']}"


@pytest.mark.parametrize("name", ["A100-80GB", "a100 80gb", "A100_80GB", "a10080gb"])
def test_names_ignore_case_spaces_hyphens(name):
    gpu = resolve_gpu(name)
    assert "A100" in gpu.name and gpu.memory_bytes == 81920 * MiB


def test_required_gpus_present():
    for name in ["T4", "V100 16GB", "A10G", "L4", "L40S", "A100 40GB", "A100 80GB", "H100", "H200", "B200",
                 "MI300X", "RTX 3090", "RTX 4090", "RTX 5090"]:
        assert resolve_gpu(name).memory_bytes > 0, name


def test_bf16_flags():
    assert resolve_gpu("T4").bf16 is False and resolve_gpu("V100 16GB").bf16 is False
    assert resolve_gpu("H100").bf16 is True and resolve_gpu("RTX 4090").bf16 is True


def test_amounts():
    assert resolve_gpu("24GB").memory_bytes == 24 * 10**9
    assert resolve_gpu("80GiB").memory_bytes == 80 * GiB


@pytest.mark.parametrize("bad,needle", [("H1000", "H100"), ("0GB", "> 0"), ("-5GiB", "> 0"), ("", "empty")])
def test_bad_gpu(bad, needle):
    with pytest.raises(FinetuneHelperError) as err:
        resolve_gpu(bad)
    assert err.value.field == "gpu" and needle in str(err.value)


@pytest.mark.integration  # asks torch for a GPU
def test_auto_without_cuda_is_a_clear_error():
    with pytest.raises(FinetuneHelperError, match="no CUDA GPU"):
        resolve_gpu("auto")
