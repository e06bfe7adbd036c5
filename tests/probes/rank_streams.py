"""Run under torchrun. Rank 0 writes, for every rank, fingerprints of the parameters the job
starts from and of the first dropout mask it draws, to the JSON file named by argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from job.config import Config
from job.dist import distributed, read_launch_env
from job.train import build_train_model

cfg = Config()
with distributed(cfg.dist, read_launch_env()) as ctx:
    model, _ = build_train_model(cfg, ctx)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    mask = torch.nn.functional.dropout(torch.ones(4096), p=0.5, training=True)
    mine = {"params": params.tolist(), "mask": mask.tolist()}
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if ctx.is_leader:
        with open(sys.argv[1], "w") as f:
            json.dump(everyone, f)
