"""segan: adversarial medical-image segmentation (SegAN) with classic GAN baselines.

Importing this package is cheap on purpose: torch, monai and mlflow are imported
inside the modules that need them, so ``segan --help`` starts in well under a second.
"""

__version__ = "0.1.0"
