"""Turning raw NIfTI scan folders (MSD, BraTS layouts) into training-ready data.

Modules: ``phantoms`` (synthetic multi-modal volumes), ``msd`` (read, validate and
split data sets), ``preprocess`` (MONAI preprocessing, on-disk cache, invertible spec).
"""
