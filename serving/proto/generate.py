"""Compile every .proto under protos/ into serving/proto/ (`make protos`).

`protos/cyborg/v1/detector.proto` becomes `serving/proto/cyborg/v1/detector_pb2.py` (+ `.pyi`,
`_pb2_grpc.py`). protoc sees protos/ mapped at `serving/proto/`, so the generated modules import
each other as `serving.proto....`, which never clashes with the `cyborg` package of the same name
as the proto package. The generated code is committed; run this after editing a .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
PREFIX = "serving/proto"


def generate(protos: Path = PROTOS, root: Path = ROOT) -> list[Path]:
    """Run protoc on every .proto; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(protos.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PREFIX}={protos}",
        f"--proto_path={include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *(f"{PREFIX}/{source.relative_to(protos)}" for source in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(map(str, sources))}")
    outputs = []
    for source in sources:
        folder = root / PREFIX / source.relative_to(protos).parent
        for parent in [folder, *folder.parents]:
            if parent == root / "serving":
                break
            (parent / "__init__.py").touch()
        outputs += sorted(folder.glob(source.stem + "_pb2*"))
    return outputs


def main() -> int:
    for path in generate():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
