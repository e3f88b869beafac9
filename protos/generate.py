"""Regenerate syncrep/pb/ from protos/*.proto.

    python protos/generate.py            # write into syncrep/pb/
    python protos/generate.py --out DIR  # write elsewhere (the staleness test)

The .proto files are mapped to the virtual path ``syncrep/pb/`` so that the
generated modules import each other as ``syncrep.pb.x_pb2`` — no sys.path hacks.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def _plugin(name: str) -> Path:
    """The protoc plugin ``name``, found next to the running interpreter first.

    Why not rely on PATH: ``scripts/test.sh`` runs ``.venv/bin/python`` directly,
    so ``.venv/bin`` (where pip put ``protoc-gen-mypy``) is not on PATH there, and
    a plugin found on PATH from earlier work would hide a missing install step.
    """
    beside = Path(sys.executable).parent / name  # not resolved: a venv's bin/ holds symlinks
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise SystemExit(
            f"{name} not found next to {sys.executable} nor on PATH: "
            "install the dev dependencies (pip install -e '.[dev]', which brings mypy-protobuf)"
        )
    return Path(found)


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_DIR.glob("*.proto"))
    (out_root / "syncrep" / "pb").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{include}",
        f"-Isyncrep/pb={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--mypy_out={out_root}",
        *[f"syncrep/pb/{p.name}" for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")
    return sorted((out_root / "syncrep" / "pb").glob("*_pb2*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    ns = ap.parse_args()
    for p in generate(ns.out):
        print(p.relative_to(ns.out))


if __name__ == "__main__":
    sys.exit(main())
