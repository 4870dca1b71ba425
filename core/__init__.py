"""The kernel that training and serving both stand on: what a deployable model *is*.

Standard library, numpy and Pillow only; it imports neither `training` nor `serving` nor torch
(tests/test_layers.py reads every import and keeps it so). One home for each fact both halves need:

- `core.contract`    model.json: schema, read / validate / write, tensor names, output shapes,
                     class order, file names, the Triton platform name
- `core.images`      decoding, validation and resizing of images exactly as the model was trained
- `core.heatmaps`    a CAM as a grid, a grayscale PNG or a colour overlay
- `core.thresholds`  how a score becomes a decision: ROC, EER, operating-point rules
- `core.errors`      the error types both halves raise (UserError and its kinds)
"""

__version__ = "0.1.0"  # the project's version (pyproject.toml), reported by the CLI, the server and results files
