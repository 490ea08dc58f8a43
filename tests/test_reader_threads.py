"""The reader stage decoding in the main process (``workers=0``) does it on one torch thread, as a worker does,
and leaves the network's thread count alone (issue 15.2: two OpenMP threads spinning beside the network doubled
the CPU time of a run)."""

from __future__ import annotations

import torch

import i2v_cli.data as data


def test_decoding_in_the_reader_thread_uses_one_torch_thread(monkeypatch, golden_order):
    seen = []
    real = data.load_and_preprocess

    def spy(path):
        seen.append(torch.get_num_threads())
        return real(path)

    monkeypatch.setattr(data, "load_and_preprocess", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = list(data.iter_batches([str(p) for p in golden_order[:3]], batch_size=2, workers=0))
        assert torch.get_num_threads() == 2  # the network's threads, in this thread, untouched
    finally:
        torch.set_num_threads(before)
    assert [b.ok for b in batches] == [[0, 1], [2]]
    assert seen == [1, 1, 1]
