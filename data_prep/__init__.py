"""Turning raw NIfTI scan folders (MSD, BraTS layouts) into training-ready data.

Modules: ``phantoms`` (synthetic multi-modal volumes and their variants, with
``phantom_spec``, ``phantom_anatomy``, ``phantom_render``), ``msd`` (read, validate and
split data sets), ``fingerprint`` (what planning needs to know about a data set),
``preprocess`` (MONAI preprocessing, on-disk cache, invertible spec), ``masks`` (the
body mask), ``cache`` (the cache folder and its keys), ``io`` (NIfTI reading/writing).
"""
