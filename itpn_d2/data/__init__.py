"""Datasets. Importing this package never imports detectron2."""

from .toy import (
    default_toy_root,
    make_toy_dataset,
    register_toy_datasets,
    render_toy_image,
    toy_class_names,
)

__all__ = [
    "default_toy_root",
    "make_toy_dataset",
    "register_toy_datasets",
    "render_toy_image",
    "toy_class_names",
]
