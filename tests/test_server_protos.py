"""The committed generated code matches the .proto files (`make protos` was run after each edit)."""

from pathlib import Path

from serving.proto.generate import PREFIX, PROTOS, ROOT, generate


def test_generated_code_is_up_to_date(tmp_path):
    fresh = generate(PROTOS, tmp_path)
    assert fresh, "no .proto files found"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        assert committed.is_file(), f"{relative} is missing: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{relative} is stale: run `make protos`"
    assert (tmp_path / PREFIX / "cyborg" / "v1" / "detector_pb2_grpc.py").is_file()
    assert Path(ROOT / PREFIX / "cyborg" / "v1" / "__init__.py").is_file()
