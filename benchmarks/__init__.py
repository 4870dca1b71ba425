"""Benchmarks and experiments, kept apart from the product and built on its own code.

- `benchmarks.serve`     server throughput and latency against in-process ONNX Runtime (`cyborg bench serve`)
- `benchmarks.decoy`     a decoy data set that tells decision-changing guidance from heatmap-only guidance
- `benchmarks.real_photos`  real faces in the user's own whole photos called fake, per operating point, through a server
- `benchmarks.bench_model`  a model repository entry with random weights, through the product's exporter
- `benchmarks.commands`  the `cyborg bench ...` commands (train, guidance, serve)

They train with `training.trainer`'s training step and export with `training.export`'s exporter;
nothing in `core`, `engines`, `training` or `serving` imports them (tests/test_layers.py).
"""
