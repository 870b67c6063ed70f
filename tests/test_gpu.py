"""Tests that need a CUDA device (marker ``gpu``; skipped without CUDA, see conftest.py).

Run them with ``pytest -m gpu tests/test_gpu.py`` or through ``tools/gpu_check.py``, which
records their outcomes in its report. Each is small enough for the check's time budget.
"""

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from _pretrain_utils import REPO  # noqa: F401  (puts the repo root on sys.path)
from pretrain.data import PretrainImages
from pretrain.config import PretrainConfig
from pretrain.engine import DistInfo, build_optimizer, resolve_config
from pretrain.main import get_args_parser, main as pretrain_main
from pretrain.models import build_pretrain_model, random_masking

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def pretrain_cfg(*argv):
    args = get_args_parser().parse_args(["--device", "cuda", *argv])
    return resolve_config(PretrainConfig.from_namespace(args), DistInfo(), CUDA)


def dtype_probe(module):
    """Records the output dtype of the first ``nn.Linear`` inside ``module`` on each call (the
    residual stream stays float32 under autocast; the matmuls are what run in bf16)."""
    seen = []
    linear = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda _, __, out: seen.append(out.dtype))
    return seen


def test_pretrain_step_bf16_autocast_and_fused_adamw():
    cfg = pretrain_cfg("--model", "itpn_base", "--mfm", "ema", "--batch_size", "16")
    assert cfg.amp == "bf16"  # the CUDA default
    model = build_pretrain_model(cfg).to(CUDA).train()
    optimizer = build_optimizer(model, cfg, CUDA)
    assert optimizer.defaults.get("fused") is True
    seen = dtype_probe(model.encoder.backbone.blocks[-1])
    images = torch.randn(16, 3, 224, 224, device=CUDA)
    masks = random_masking(16, 196, 0.75, torch.Generator().manual_seed(0), CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, masks)
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss).item() and seen == [torch.bfloat16]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _pretrain(root, out, *extra):
    return pretrain_main(["--model", "itpn_nano", "--data_path", str(root), "--input_size", "64",
                          "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0.5",
                          "--lr", "1e-3", "--mfm", "ema", "--drop_path", "0.1",
                          "--num_workers", "0", "--vis_images", "0", "--log_every", "2",
                          "--device", "cuda", "--output_dir", str(out), *extra])


def test_pretrain_checkpoint_and_exact_resume_on_cuda(toy_root, tmp_path):
    # What is tested is the resumed state (weights, optimizer, RNGs, data order), so kernels
    # that sum in a varying order (atomics; fused attention backward) are kept out: the math
    # attention, deterministic algorithms, cuBLAS with a fixed workspace (gpu_check sets
    # CUBLAS_WORKSPACE_CONFIG), and no cuDNN autotuning (pretrain.checkpointing turns it off).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            full = _pretrain(toy_root, tmp_path / "full")
            part = _pretrain(toy_root, tmp_path / "part", "--max_steps", "6")
            rest = _pretrain(toy_root, tmp_path / "part", "--auto_resume")
    finally:
        torch.use_deterministic_algorithms(False)
    assert (full.step, part.step, rest.step) == (12, 6, 12)
    losses = [h["loss"] for h in part.history + rest.history]
    assert losses == [h["loss"] for h in full.history]
    for (name, a), b in zip(full.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_pretrain_with_gpu_decode(tmp_path):
    from itpn_d2.benchmark import make_jpeg_corpus

    make_jpeg_corpus(tmp_path / "jpegs", count=16, size=(200, 150), quality=90)
    result = pretrain_main(["--model", "itpn_nano", "--data_path", str(tmp_path / "jpegs"),
                            "--input_size", "64", "--batch_size", "8", "--epochs", "2",
                            "--decode", "gpu", "--num_workers", "2", "--vis_images", "2",
                            "--device", "cuda", "--output_dir", str(tmp_path / "out")])
    assert result.step == 4 and all(torch.isfinite(torch.tensor(h["loss"]))
                                    for h in result.history)


def test_gpu_decode_close_to_pil_path(tmp_path):
    from itpn_d2.benchmark import make_jpeg_corpus
    from pretrain.gpu_data import EncodedImages, GPUDecoder, collate_encoded

    make_jpeg_corpus(tmp_path, count=8, size=(500, 375), quality=90)
    items = [(i, 100 + i) for i in range(8)]
    ref = torch.stack([PretrainImages(tmp_path, 224)[it][0] for it in items])
    batch, _ = collate_encoded([EncodedImages(tmp_path, 224)[it] for it in items])
    out = GPUDecoder(CUDA, 224)(batch)
    assert out.device.type == "cuda" and out.shape == ref.shape
    diff = (out.cpu().int() - ref.int()).abs().float()
    assert diff.mean() < 2.0, diff.mean()  # nvjpeg's IDCT / upsampling differ from libjpeg's


def _train_net():
    spec = importlib.util.spec_from_file_location("itpn_train_net",
                                                  ROOT / "tools" / "lazyconfig_train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config, size", [("configs/toy/mask_rcnn_itpn_nano.py", 128),
                                          ("configs/coco/mask_rcnn_itpn_b.py", 1024)])
def test_d2_amp_trainer_iteration_bf16(config, size):
    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import AMPTrainer
    from detectron2.utils.events import EventStorage

    from itpn_d2.benchmark import synthetic_d2_batch

    cfg = LazyConfig.load(str(ROOT / config))
    cfg.train.amp.enabled, cfg.train.device = True, "cuda"
    model = instantiate(cfg.model).to(CUDA).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    batch = synthetic_d2_batch(2, size, cfg.model.roi_heads.num_classes, 4, CUDA)
    trainer = _train_net().make_trainer(cfg, model, itertools.repeat(batch), optimizer)
    assert isinstance(trainer, AMPTrainer) and trainer.precision == torch.bfloat16
    seen = dtype_probe(model.backbone)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad][:4]
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
        losses = {k: v[0] for k, v in storage.latest().items() if k.startswith("loss")}
    assert seen == [torch.bfloat16] and losses
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    after = [p for p in model.parameters() if p.requires_grad][:4]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the optimizer stepped


def test_upernet_slide_inference():
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(ROOT / "configs/ade20k/upernet_itpn_b.py"))
    model = instantiate(cfg.model).to(CUDA).eval()
    assert model.inference_mode == "slide"
    image = torch.randint(0, 256, (3, 512, 683), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        (out,) = model([{"image": image.float(), "height": 512, "width": 683}])
    logits = out["sem_seg"]
    assert logits.shape == (150, 512, 683) and torch.isfinite(logits).all()
