"""iTPN-D2 package. Detectron2 itself is installed by ``tools/install_detectron2.py``."""

from pathlib import Path

from setuptools import find_packages, setup


def _version() -> str:
    # Read without importing the package (its dependencies may not be installed yet).
    for line in (Path(__file__).parent / "itpn_d2" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("itpn_d2/__init__.py defines no __version__")


setup(
    name="itpn_d2",
    version=_version(),
    description="iTPN (HiViT backbone + integral feature pyramid) for Detectron2",
    packages=find_packages(include=["itpn_d2", "itpn_d2.*", "pretrain", "pretrain.*"]),
    # the shipped toy checkpoints (itpn_d2.zoo)
    package_data={"itpn_d2": ["weights/*.pth", "weights/*.json", "weights/*.png"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=0.9",
        "fvcore",
        "iopath",
        "pycocotools",
        "open_clip_torch",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
        "tensorboard",
        # Runtime requirements of detectron2, which is installed without its dependencies.
        "omegaconf>=2.1,<2.4",
        "hydra-core",
        "cloudpickle",
        "tabulate",
        "termcolor",
        "yacs",
        "black",
        "setuptools<81",  # detectron2.model_zoo imports pkg_resources
        "opencv-python-headless",  # detectron2.utils.visualizer imports cv2
    ],
    entry_points={
        "console_scripts": [
            # The same functions as python pretrain/main.py and python tools/<name>.py.
            "itpn-pretrain = pretrain.launch:cli",
            "itpn-export-backbone = pretrain.export:cli",
            "itpn-visualize-reconstruction = pretrain.visualize:cli",
            "itpn-make-toy = itpn_d2.data.toy:cli",
            "itpn-prepare-ade20k = itpn_d2.data.ade20k:cli",
            "itpn-convert-checkpoint = itpn_d2.convert:cli",
            "itpn-predict = itpn_d2.d2.predictor:cli",
            "itpn-probe = itpn_d2.probe:cli",
        ],
    },
    extras_require={
        "dev": ["pytest"],
        # ONNX export (tools/export_model.py --format onnx) and its checks; ~120 MB.
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
)
