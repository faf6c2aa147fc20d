import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fake_data  # noqa: E402


@pytest.fixture
def fake_train(monkeypatch, tmp_path):
    """Run the trainer on fake_data; returns run(**overrides) -> summary."""
    from pyprotoclip.train import params as P
    from pyprotoclip.train import trainer

    def run(**overrides):
        p = P.defaults()
        p.update(train_data="fake", model="tiny-vit", batch_size=8, epochs=1, workers=0, warmup=1,
                 logs=str(tmp_path / "logs"), name="run", precision="fp32", log_every_n_steps=1,
                 train_num_samples=16, lr=1e-3)
        p.update(overrides)
        return trainer.run(p, data=fake_data.module)

    return run
