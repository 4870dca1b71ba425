"""Write a realistic model repository entry for `cyborg bench serve` without a trained checkpoint.

    .venv/bin/python scripts/bench_model.py models-bench --arch efficientnet_lite0

Random weights (throughput does not depend on them), exported through torch.onnx with a dynamic
batch, outputs `score`, `logits`, `cam` as the model contract names them, and a model.json.
Prefer `cyborg export` on a real checkpoint; this exists so the serving benchmark can run on a
fresh clone. Needs torch (the benchmark itself does not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core import contract
from training.model import create_classifier, default_image_size, fake_probability, select_cam


class ContractGraph(torch.nn.Module):
    """uint8 images -> (score, logits, CAM of the predicted class), the contract's outputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model(images)
        cam = select_cam(out.class_maps, out.logits.argmax(dim=1))
        return fake_probability(out.logits), out.logits, cam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--name", default=None, help="model name (default: the architecture)")
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    size = default_image_size(args.arch)
    classifier = create_classifier(args.arch).eval()
    graph = ContractGraph(classifier).eval()
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        cam_h, cam_w = classifier(example).class_maps.shape[-2:]
    folder = args.repository / (args.name or args.arch) / str(args.version)
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=256)
    torch.onnx.export(
        graph,
        (example,),
        str(folder / contract.ONNX_FILE),
        input_names=[contract.INPUT_NAME],
        output_names=list(contract.OUTPUT_NAMES),
        dynamic_shapes={"images": {0: batch}},
        dynamo=True,
        external_data=False,
    )
    mean, std = classifier.pixel_mean.flatten() / 255.0, classifier.pixel_std.flatten() / 255.0
    entry = contract.ModelContract(
        name=args.name or args.arch,
        version=args.version,
        architecture=args.arch,
        input_height=size,
        input_width=size,
        cam_height=int(cam_h),
        cam_width=int(cam_w),
        mean=tuple(round(float(v), 6) for v in mean),
        std=tuple(round(float(v), 6) for v in std),
        threshold=0.5,
        training={"saliency": "none", "note": "random weights, for benchmarks only"},
        files={contract.ONNX_FILE: contract.sha256_file(folder / contract.ONNX_FILE)},
        created=contract.utc_now(),
    )
    print(contract.write_contract(folder, entry))


if __name__ == "__main__":
    main()
