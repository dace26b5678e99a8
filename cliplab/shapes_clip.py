"""The `shapes` profile's tiny CLIP: an open_clip CLIP with a small config (``model_configs/``), registered with
open_clip by name, and its shipped weights.

The checkpoint ``cliplab/weights/cliplab-shapes-tiny.safetensors`` is the output of
``study.pretraining.train_shapes_clip`` (``cliplab train-shapes-clip``), stored in float16 to stay under 10
MB; ``tests/test_shapes_clip.py`` checks that the recipe still learns.
"""
from __future__ import annotations

from pathlib import Path

MODEL_NAME = "cliplab-shapes-tiny"  # registered with open_clip from cliplab/model_configs/
WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL_NAME}.safetensors"


def register_model_configs() -> None:
    """Make cliplab's own model configs (this tiny CLIP) known to open_clip by name."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).parent / "model_configs")
