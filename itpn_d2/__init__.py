"""iTPN-D2: integrally pre-trained transformer pyramid networks for Detectron2.

Importing this package (or ``itpn_d2.modeling``) never imports detectron2: pretraining runs
without it. Detectron2-specific code lives in ``itpn_d2.d2`` and is imported explicitly.
"""

__version__ = "0.1.0"
