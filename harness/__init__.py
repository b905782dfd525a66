"""Multi-framework comparison harness: one model spec, many deep learning frameworks.

The parent side (this package) never imports a deep learning framework; each backend runs in its
own environment and process (see backends/).
"""

__version__ = "0.1.0"
