"""Fixtures for the data tests."""

from __future__ import annotations

import pytest

from pyprotoclip.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict:
    """240 train samples in 6 shards of 40, 40 val, 40 ood; 32x32 images."""
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_dataset(str(out), 240, seed=3, image_size=32, samples_per_shard=40, num_val=40, num_ood=40,
                                   progress=False, processes=1)
