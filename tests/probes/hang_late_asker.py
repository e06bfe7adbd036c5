"""Started by hand as 3 ranks (RANK, WORLD_SIZE=3, MASTER_ADDR/PORT: rank 0's process hosts the
store, as in the job without an elastic agent). After the group exists, rank 1 stops taking part
(as a SIGSTOPped rank would), rank 0 asks at once who arrived and exits as soon as it has its answer
(as the job does), rank 2 asks LATE_S seconds later, as a rank that timed out later on a loaded host
does. Rank 2 prints what it heard as JSON and exits 0 when it heard rank 0 and itself (the store
still answered), 1 when it got no answer. Ends through job/process_exit.py like the job."""

import json
import time

import torch.distributed as dist

from job.hang import Whereabouts, answers_after_timeout
from job.process_exit import exit_now, keep_until_exit

TIMEOUT_S, LATE_S = 3, 2.0

dist.init_process_group("gloo")
keep_until_exit(dist.group.WORLD)
rank = dist.get_rank()
dist.barrier()
if rank == 1:
    time.sleep(4 * TIMEOUT_S)  # never asks; outlives the others
    exit_now(0)
if rank == 2:
    time.sleep(LATE_S)
answers = answers_after_timeout(Whereabouts(step=7, phase=None), rank, 3, TIMEOUT_S)
if rank == 2:
    print(json.dumps({str(k): v.collective() for k, v in answers.items()} if answers is not None else None))
    exit_now(0 if answers is not None and sorted(answers) == [0, 2] else 1)
exit_now(0 if answers is not None else 1)
