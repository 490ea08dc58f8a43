"""Fidelity: i2v's tag scores against the original pipeline's (shared/golden), from both caffemodel formats."""

from __future__ import annotations

import numpy as np
import pytest

from i2v_cli.runner import run_model
from i2v_cli.weights import load_model


@pytest.mark.parametrize("name", ["tag_v1", "tag_v2"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_tag_scores_match_the_original_pipeline(golden, golden_order, name, batch_size):
    model, info = load_model(golden / "models" / f"{name}.caffemodel", kind="tag")
    assert info.kind == "tag"
    results = [r for batch in run_model(model, [str(p) for p in golden_order], batch_size=batch_size) for r in batch]
    assert [r.path for r in results] == [str(p) for p in golden_order]
    got = np.stack([r.output for r in results])
    expected = np.load(golden / "expected" / f"{name}.npy")
    assert got.shape == expected.shape == (12, 1539)
    # 224x224 images: the network alone (tolerance 1e-4); mixed sizes: the exact resize too (goal 1e-3).
    np.testing.assert_allclose(got[:3], expected[:3], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[3:], expected[3:], atol=1e-3, rtol=0)
    assert ((got > 0.5) == (expected > 0.5)).mean() == 1.0
