"""feclip: FE-CLIP (Frequency Enhanced CLIP, ICCV 2025) for zero-shot anomaly detection and segmentation.

The library imports without Hydra; Hydra lives in :mod:`feclip.apps.train` only (the command-line apps are in :mod:`feclip.apps`).
Sub-packages: :mod:`feclip.models`, :mod:`feclip.data`, :mod:`feclip.metrics`, :mod:`feclip.engine`.
"""

__version__ = "0.1.0"
