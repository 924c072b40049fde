"""The live-bytes tracker: exact on known allocations, equal to PyTorch's own MemTracker on a real training step."""

from __future__ import annotations

import pytest

from finetune_helper.measure.tracker import live_bytes_mode, model_tensors

#: integration tier (make test-integration): real torch / transformers / trainer / server work
pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")


def test_peak_counts_storages_once_and_frees_them():
    with live_bytes_mode() as m:
        a = torch.empty(1000, dtype=torch.float32)           # 4000 B
        view = a[10:20]                                        # a view: same storage, nothing new
        b = torch.empty(500, dtype=torch.bfloat16)            # 1000 B
        a.add_(1)                                              # in place: nothing new
        assert m.current == 5000 and m.peak == 5000 and view.numel() == 10
        del a, view
        c = torch.empty(2000, dtype=torch.int8)               # 2000 B after 4000 B were freed
        assert m.current == 3000 and m.peak == 5000
        m.reset_peak()
        d = torch.empty(3000, dtype=torch.int8)
        assert m.peak == 6000 and b.numel() + c.numel() + d.numel() == 5500


def test_registered_tensors_count_from_the_start():
    model = torch.nn.Linear(64, 32)
    with live_bytes_mode() as m:
        m.register(model_tensors(model), "weights")
        assert m.current == (64 * 32 + 32) * 4


def test_agrees_with_pytorchs_memtracker_on_a_training_step():
    """``torch.distributed._tools.mem_tracker.MemTracker`` on the same full fine-tuning step of a tiny Llama."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    ids = torch.randint(0, 256, (2, 32))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on: both trackers see the same steady step
    reference = MemTracker()
    reference.track_external(model, optimizer)
    with reference:
        step()
    theirs = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    mine = live_bytes_mode()
    mine.register([*model_tensors(model), *[t for s in optimizer.state.values() for t in s.values()
                                           if isinstance(t, torch.Tensor)]])
    with mine:
        step()
    assert abs(mine.peak - theirs) <= 1024, (mine.peak, theirs)
