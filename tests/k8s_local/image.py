"""The image as a container runtime sees it: its config, read from docker/Dockerfile's final stage,
and the files on this machine that stand in for its content."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# debian:bookworm-slim's PATH, the base the image's `ENV PATH=/opt/venv/bin:$PATH` extends.
BASE_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageConfig:
    """The final stage of docker/Dockerfile: what a container runtime takes from the image."""

    env: dict[str, str]
    workdir: str
    uid: int
    gid: int
    entrypoint: list[str]
    cmd: list[str]

    @classmethod
    def from_dockerfile(cls, path: Path) -> ImageConfig:
        text = re.sub(
            r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
        )
        stage = text[text.rindex("\nFROM ") :].splitlines()
        env, workdir, user, entrypoint, cmd = {"PATH": BASE_IMAGE_PATH}, "/", "0:0", [], []
        for line in stage:
            instruction, _, rest = line.strip().partition(" ")
            if instruction == "ENV":
                for pair in shlex.split(rest):
                    key, _, value = pair.partition("=")
                    env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
            elif instruction == "WORKDIR":
                workdir = os.path.join(workdir, rest.strip())
            elif instruction == "USER":
                user = rest.strip()
            elif instruction == "ENTRYPOINT":
                entrypoint = json.loads(rest)
            elif instruction == "CMD":
                cmd = json.loads(rest)
        uid, _, gid = user.partition(":")
        return cls(env, workdir, int(uid), int(gid or uid), entrypoint, cmd)


@dataclass(frozen=True)
class Host:
    """Where the image's files come from on this machine."""

    checkout: Path
    """The clone whose job/ is the image's /app/job, and whose docker/Dockerfile gives its config."""
    venv: Path
    """The virtual environment that stands in for the image's /opt/venv."""
    data: Path
    """A directory with MNIST/raw/: stands in for the MNIST baked into the image at /app/data."""

    @classmethod
    def of(cls, checkout: Path, data: Path) -> Host:
        return cls(checkout=checkout, venv=checkout / ".venv", data=data)

    def python_home(self) -> Path:
        """The interpreter the venv was made from (its bin/python links there)."""
        cfg = dict(
            line.split(" = ", 1) for line in (self.venv / "pyvenv.cfg").read_text().splitlines() if " = " in line
        )
        return Path(cfg["home"]).parent
