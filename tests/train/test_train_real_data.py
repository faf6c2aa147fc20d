"""Training on real shards from the synthetic generator through pyprotoclip.data (slower: marked slow)."""

import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pyprotoclip.data import write_synthetic_dataset

    out = tmp_path_factory.mktemp("syn")
    info = write_synthetic_dataset(str(out), 64, num_val=32, num_ood=0, samples_per_shard=24, progress=False, processes=1)
    return info


def _run(shards, tmp_path, **kw):
    from pyprotoclip.train import params as P
    from pyprotoclip.train import trainer

    p = P.defaults()
    p.update(train_data=shards["train_shards"], model="tiny-rn", batch_size=16, epochs=2, workers=2, warmup=1,
             logs=str(tmp_path), precision="fp32", log_every_n_steps=2, lr=1e-3, save_every_n_steps=1)
    p.update(kw)
    s = trainer.run(p)
    return {k: v.detach().clone() for k, v in s["model"].state_dict().items()}, s


def test_resume_is_exact_with_real_loader_and_workers(shards, tmp_path):
    full, s = _run(shards, tmp_path, name="full", val_data=shards["val_shards"], zeroshot_frequency=1)
    assert s["step"] == 8  # 64 samples / 16 = 4 steps x 2 epochs
    # stop mid-epoch 1 (step 6 = batch 2 of epoch 1), resume through worker rotation and shard skipping
    _run(shards, tmp_path, name="cut", stop_after_steps=6)
    got, s2 = _run(shards, tmp_path, name="cut", resume="latest")
    assert s2["step"] == 8
    diff = [k for k in full if not torch.equal(full[k], got[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    rows = open(os.path.join(s["run_dir"], "results.jsonl")).read()
    assert '"zeroshot_top1"' in rows
