"""The reader stage decoding in the main process (``workers=0``) does it on one torch thread, as a worker does,
and leaves the network's thread count alone (issue 15.2: two OpenMP threads spinning beside the network doubled
the CPU time of a run)."""

from __future__ import annotations

import os
import time

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


def test_workers_share_every_network_batch(monkeypatch, golden_order, tmp_path):
    """A network batch is decoded by all the workers, in parts, and joined again in input order (issue 15.5: on
    a 16-core GPU machine `-b 256 -j 14` decoded each batch of 256 in one worker and tagged no faster than -j 4).
    A file that fails keeps its place; the joined inputs are those that one process decodes."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    paths = [str(p) for p in golden_order[:4]] + [str(broken)] + [str(p) for p in golden_order[4:9]]
    position = {path: i for i, path in enumerate(paths)}
    real = data.load_and_preprocess
    seen = tmp_path / "seen"
    seen.mkdir()

    def spy(path):
        (seen / f"{position[str(path)]}-{os.getpid()}").touch()
        time.sleep(0.05)  # so that one worker cannot take every job before the other starts
        return real(path)

    monkeypatch.setattr(data, "load_and_preprocess", spy)
    batches = list(data.iter_batches(paths, batch_size=8, workers=2))
    assert [b.ok for b in batches] == [[0, 1, 2, 3, 5, 6, 7], [8, 9]]
    assert [sorted(b.errors) for b in batches] == [[4], []]
    decoders = {f.name.split("-")[1] for f in seen.iterdir() if int(f.name.split("-")[0]) < 8}
    assert len(decoders) == 2, "the first network batch was decoded by one worker only"
    alone = list(data.iter_batches(paths, batch_size=8, workers=0))
    for split, whole in zip(batches, alone, strict=True):
        assert torch.equal(split.inputs, whole.inputs)


def test_decoding_jobs_never_span_two_network_batches():
    assert data.chunk_size(256, 14) == 19 and data.chunk_size(16, 1) == 16 and data.chunk_size(8, 4) == 4
    assert data.chunk_size(4, 8) == 4  # never below MIN_CHUNK, never above the batch
    jobs = data.decoding_jobs(range(10), 8, 3)
    assert jobs == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert data.decoding_jobs(range(5), 2, None) == [[0, 1], [2, 3], [4]]


def test_default_workers_use_the_cores_when_the_network_is_on_a_gpu(monkeypatch):
    import i2v_cli.cli.common as common
    import i2v_cli.inference as inference

    monkeypatch.setattr(common, "_usable_cores", lambda: 16)
    model = torch.nn.Linear(1, 1)
    assert common.default_workers() == 4 and common.default_workers(model) == 4  # the CPU runs the network too
    monkeypatch.setattr(inference, "model_device", lambda _: torch.device("cuda"))
    assert common.default_workers(model) == 15


def test_more_workers_than_cores_is_no_warning(golden_order):
    """torch advises against more workers than cores when a loader is made; the user asked for them, so it never
    reaches their terminal (it did whenever a run had a single batch shared among workers)."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data.make_loader([str(p) for p in golden_order[:4]], batch_size=1, workers=64)
    assert not [w for w in seen if "worker processes" in str(w.message)]
