"""Launched by torchrun in test_train.py: a 2-process gloo run on fake_data; rank 0 saves the weights."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fake_data  # noqa: E402

from pyprotoclip.train import params as P  # noqa: E402
from pyprotoclip.train import trainer  # noqa: E402

out, logs, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = P.defaults()
p.update(train_data="fake", model="tiny-vit", batch_size=batch, epochs=1, workers=0, warmup=1, logs=logs,
         name="ddp", precision="fp32", log_every_n_steps=1, train_num_samples=32, lr=0.1, eps=1.0, wd=0.0)
summary = trainer.run(p, data=fake_data.module)
if int(os.environ["RANK"]) == 0:
    torch.save({k: v.clone() for k, v in summary["model"].state_dict().items()}, out)
