"""Run under torchrun with an empty data root in argv[1]. Every rank prepares MNIST the way the job
does; the fetch is replaced by one that leaves a marker naming its rank and writes generated files.
Each rank then writes how many training samples it loaded."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers' dataset generator

from helpers import make_tiny_mnist  # noqa: E402

from job import data  # noqa: E402
from job.config import load_config  # noqa: E402
from job.launch_env import read_launch_env  # noqa: E402
from job.process_group import distributed  # noqa: E402
from job.train import prepare_data  # noqa: E402

root = Path(sys.argv[1])


def fetch_generated(dest: Path) -> None:
    (root / f"fetched-by-rank-{os.environ['RANK']}").touch()
    make_tiny_mnist(dest / "gen")
    for name in data.SHA256:
        (dest / "gen/MNIST/raw" / name).replace(dest / name)


data._fetch_with_torchvision = fetch_generated
data._check_sha256 = lambda path: None  # generated files, not the real MNIST

cfg = load_config(overrides=[f"data.root={root}"])
with distributed(cfg.dist, read_launch_env()) as ctx:
    splits = prepare_data(cfg, ctx, splits=("train", "test"))
    (root / f"loaded-by-rank-{ctx.rank}").write_text(str(len(splits["train"])))
