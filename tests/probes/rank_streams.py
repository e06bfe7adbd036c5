"""Run under torchrun. Rank 0 writes, for every rank, fingerprints of the parameters the job's
Trainer starts from and of the first dropout mask it draws, to the JSON file named by argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from job.checkpoint import Checkpoints
from job.config import Config
from job.data import Split
from job.dist import distributed, read_launch_env
from job.run_dir import RunDir
from job.train import Trainer

cfg = Config()
with distributed(cfg.dist, read_launch_env()) as ctx:
    blank = Split(images=torch.zeros(64, 1, 28, 28), labels=torch.zeros(64, dtype=torch.long))
    checkpoints = Checkpoints(cfg, ctx, RunDir(cfg.run_dir))
    model = Trainer(cfg, ctx, {"train": blank, "test": blank}, checkpoints).model
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    mask = torch.nn.functional.dropout(torch.ones(4096), p=0.5, training=True)
    mine = {"params": params.tolist(), "mask": mask.tolist()}
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if ctx.is_leader:
        with open(sys.argv[1], "w") as f:
            json.dump(everyone, f)
