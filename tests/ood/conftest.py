import pytest


@pytest.fixture(scope="session")
def ood_data(tmp_path_factory):
    """A tiny synthetic dataset (64x64): 96 training samples (20 classes), 32 val, 32 ood (12 unseen classes)."""
    from pyprotoclip.data import write_synthetic_dataset

    out = tmp_path_factory.mktemp("ood_data")
    write_synthetic_dataset(str(out), 96, num_val=32, num_ood=32, samples_per_shard=32, processes=1, progress=False)
    return {"root": out, "train": str(out / "train" / "{00000..00002}.tar"), "val": str(out / "val" / "00000.tar"),
            "ood": str(out / "ood" / "00000.tar")}


@pytest.fixture
def train_params(ood_data, tmp_path):
    def make(**overrides):
        p = dict(train_data=ood_data["train"], backbone="tiny-rn", batch_size=8, epochs=1, lr=0.05, warmup_epochs=0,
                 workers=0, precision="fp32", logs=str(tmp_path / "logs"), name="run", log_every_n_steps=1,
                 train_num_samples=8, cache_size=2, k=2, device="cpu")
        p.update(overrides)
        return p

    return make


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: one thread is as fast, and far faster when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
