"""Generate the Python gRPC stubs from ``protos/baton/v1/*.proto`` (run by the build; stubs are not committed).

protoc writes ``from baton.v1 import x_pb2``; our import package is ``baton.protos.baton.v1``, so the generated
imports are rewritten to that. ``ensure_generated()`` regenerates when a ``.proto`` is newer than its stubs, so a
fresh clone (or a device run) works without a separate step.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_DIR = PROTO_ROOT / "baton" / "v1"


def _stale(proto: Path) -> bool:
    stub = proto.with_name(proto.stem + "_pb2.py")
    grpc_stub = proto.with_name(proto.stem + "_pb2_grpc.py")
    return any(
        not p.exists() or p.stat().st_mtime < proto.stat().st_mtime for p in (stub, grpc_stub)
    )


def generate(force: bool = False) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    written: list[Path] = []
    for proto in protos:
        if not force and not _stale(proto):
            continue
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={PROTO_ROOT}",
            f"--pyi_out={PROTO_ROOT}",
            f"--grpc_python_out={PROTO_ROOT}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")
        for out in proto.parent.glob(proto.stem + "_pb2*.py"):
            text = out.read_text()
            fixed = re.sub(
                r"^from baton\.v1 import", "from baton.protos.baton.v1 import", text, flags=re.M
            )
            out.write_text(fixed)
            written.append(out)
    return written


def ensure_generated() -> None:
    if any(_stale(p) for p in PROTO_DIR.glob("*.proto")):
        generate()


if __name__ == "__main__":
    done = generate(force="--force" in sys.argv)
    print(f"generated {len(done)} stub files under {PROTO_DIR}")
