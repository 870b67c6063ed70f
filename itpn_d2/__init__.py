"""iTPN-D2: integrally pre-trained transformer pyramid networks for Detectron2.

Importing this package (or ``itpn_d2.modeling``) never imports detectron2: pretraining runs
without it. Detectron2-specific code lives in ``itpn_d2.d2`` and is imported explicitly, or on
first use of ``itpn_d2.Predictor`` (one-call inference, :class:`itpn_d2.d2.Predictor`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ``import itpn_d2`` must not import detectron2; ``itpn_d2.Predictor`` does.
    if name == "Predictor":
        from .d2.predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
