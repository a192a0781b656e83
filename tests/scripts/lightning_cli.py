"""``LightningCLI`` over the recipes' ImageClassifier and ImageDataModule, for ``tests/test_lightning_cli.py``.

    python tests/scripts/lightning_cli.py fit --config cfg.yaml

The callback comes from the config file (``trainer.callbacks``), as in a LightningCLI project.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from pytorch_lightning.cli import LightningCLI  # noqa: E402
from recipe_common import ImageClassifier, ImageDataModule  # noqa: E402

if __name__ == "__main__":
    LightningCLI(ImageClassifier, ImageDataModule, save_config_kwargs={"overwrite": True})
