"""The committed generated code must match protos/*.proto (fails when stale)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto_sources(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted((tmp_path / "syncrep" / "pb").glob("*_pb2*"))
    assert fresh, "generator produced nothing"
    for f in fresh:
        committed = ROOT / "syncrep" / "pb" / f.name
        assert committed.exists(), f"{committed} missing: run python protos/generate.py"
        assert committed.read_text() == f.read_text(), (
            f"{committed.relative_to(ROOT)} is stale: run `python protos/generate.py` and commit"
        )


def test_generated_modules_import_as_part_of_the_package() -> None:
    from syncrep.pb import syncrep_pb2, syncrep_pb2_grpc

    assert syncrep_pb2.DESCRIPTOR.package == "syncrep.v1"
    assert hasattr(syncrep_pb2_grpc, "ReplicaServiceStub")
