"""The iTPN network (HiViT backbone + integral pyramid); imports no detectron2."""

from .features import LEVELS, STAGES, feature_info, stage_channels
from .hivit import HiViT, HiViTFeatures, hivit_layer_id
from .itpn import (ARCHS, ITPN, build_itpn, itpn_base, itpn_large, itpn_nano, itpn_small,
                   itpn_tiny)
from .layers import map_to_tokens, tokens_to_map
from .pyramid import IntegralPyramid

__all__ = [
    "ARCHS", "ITPN", "LEVELS", "STAGES", "HiViT", "HiViTFeatures", "IntegralPyramid", "build_itpn",
    "feature_info", "hivit_layer_id", "itpn_base", "itpn_large", "itpn_nano", "itpn_small",
    "itpn_tiny", "map_to_tokens", "stage_channels", "tokens_to_map",
]
