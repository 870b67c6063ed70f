"""The GPU data path (pretrain/gpu_data.py) run on the CPU: same crop boxes as the PIL path
under one seed, close pixels, EXIF orientation, CPU fallbacks, the deprecation filter."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from _pretrain_utils import REPO  # noqa: F401  (puts the repo root on sys.path)
from pretrain.data import PretrainImages, sample_crop, to_uint8_tensor
from pretrain.config import PretrainConfig
from pretrain.engine import DistInfo, resolve_config
from pretrain.gpu_data import (EXIF_ORIENTATION, DecodeDeviceError, EncodedImages, GPUDecoder,
                               collate_encoded, decode_jpegs, orient, read_sample)
from pretrain.main import get_args_parser


def smooth_image(seed, size=(160, 120)):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    for i in range(6):
        smooth_image(i).save(root / f"{i}.JPEG", quality=90)
    return root


def run_gpu_path(dataset, items, size):
    batch, bad = collate_encoded([dataset[it] for it in items])
    decoder = GPUDecoder("cpu", size)
    return decoder(batch), batch, decoder


def test_same_boxes_and_close_pixels_as_pil_path(jpeg_dir):
    items = [(i, 1000 + 7 * i) for i in range(6)]
    pil, enc = PretrainImages(jpeg_dir, 64), EncodedImages(jpeg_dir, 64)
    ref = torch.stack([pil[it][0] for it in items])
    out, batch, decoder = run_gpu_path(enc, items, 64)
    assert batch.crops == [sample_crop(s, 160, 120) for _, s in items]
    assert any(c.flip for c in batch.crops) and not all(c.flip for c in batch.crops)
    assert out.dtype == torch.uint8 and out.shape == ref.shape
    diff = (out.int() - ref.int()).abs().float()
    # Measured: mean 0.17, max 1 grey level (torch's antialiased bicubic vs PIL's).
    assert diff.mean() < 0.5 and diff.max() <= 2
    assert decoder.cpu_fallbacks == 0 and decoder.images == 6


def with_orientation(img, orientation):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    img.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pil(tmp_path, orientation):
    # Four flat quadrants: any wrong flip or rotation moves colours by ~200 levels.
    quad = np.zeros((24, 40, 3), np.uint8)
    quad[:12, :20] = (250, 10, 10)
    quad[:12, 20:] = (10, 250, 10)
    quad[12:, :20] = (10, 10, 250)
    quad[12:, 20:] = (250, 250, 10)
    path = tmp_path / "o.jpg"
    path.write_bytes(with_orientation(Image.fromarray(quad), orientation))
    sample = read_sample(str(path), seed=3, scale=(0.2, 1.0), hflip=True)
    assert sample.orientation == orientation and sample.decoded is None
    image = orient(decode_jpegs([torch.frombuffer(bytearray(sample.data), dtype=torch.uint8)],
                                torch.device("cpu"))[0], orientation)
    with Image.open(path) as img:
        ref = to_uint8_tensor(ImageOps.exif_transpose(img).convert("RGB"))
    assert image.shape == ref.shape
    assert (image.int() - ref.int()).abs().max() <= 8  # JPEG edge ringing only
    # The crop box is drawn on the upright size.
    assert sample.crop == sample_crop(3, ref.shape[2], ref.shape[1])


def test_other_files_fall_back_to_pil_and_are_counted(tmp_path):
    img = smooth_image(1, (96, 80))
    img.convert("L").save(tmp_path / "gray.JPEG", quality=90)
    img.convert("CMYK").save(tmp_path / "cmyk.JPEG", quality=90)
    img.save(tmp_path / "png.JPEG", format="PNG")  # a PNG named .JPEG, as ImageNet has
    img.save(tmp_path / "rgb.JPEG", quality=90)
    items = [(i, 50 + i) for i in range(4)]
    pil, enc = PretrainImages(tmp_path, 32), EncodedImages(tmp_path, 32)
    out, batch, decoder = run_gpu_path(enc, items, 32)
    assert sorted(batch.decoded) == [0, 1, 2]  # cmyk, gray, png (sorted file names)
    assert decoder.cpu_fallbacks == 3 and decoder.images == 4
    ref = torch.stack([pil[it][0] for it in items])
    assert (out.int() - ref.int()).abs().float().mean() < 0.5


def test_collate_joins_bytes_into_one_tensor(jpeg_dir):
    enc = EncodedImages(jpeg_dir, 64)
    samples = [enc[(i, i)] for i in range(3)]
    batch, bad = collate_encoded(samples)
    assert batch.data.dim() == 1 and len(batch.offsets) == 4 and bad.tolist() == [0, 0, 0]
    for i, (s, _) in enumerate(samples):
        assert bytes(batch.data[batch.offsets[i]:batch.offsets[i + 1]].numpy()) == s.data


def test_decode_keeps_torchvision_deprecation_out_of_logs(jpeg_dir):
    data = torch.frombuffer(bytearray((jpeg_dir / "0.JPEG").read_bytes()), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail here
        (image,) = decode_jpegs([data], torch.device("cpu"))
    assert image.shape == (3, 120, 160)


def test_decode_gpu_needs_cuda():
    args = get_args_parser().parse_args(["--decode", "gpu", "--device", "cpu"])
    with pytest.raises(DecodeDeviceError) as e:
        resolve_config(PretrainConfig.from_namespace(args), DistInfo(), torch.device("cpu"))
    assert str(e.value) == ("--decode gpu needs a CUDA device, got cpu; use --decode cpu "
                            "(the default) on this machine")
    assert get_args_parser().parse_args([]).decode == "cpu"


def test_through_a_loader_worker_as_the_pil_loader(jpeg_dir):
    from torch.utils.data import DataLoader

    from pretrain.data import ResumableSampler

    def batches(dataset, **kw):
        sampler = ResumableSampler(dataset, seed=5)
        sampler.set_epoch(1)
        return list(DataLoader(dataset, batch_size=3, sampler=sampler, drop_last=True, **kw))

    ref = batches(PretrainImages(jpeg_dir, 48))
    got = batches(EncodedImages(jpeg_dir, 48), num_workers=1, collate_fn=collate_encoded)
    decoder = GPUDecoder("cpu", 48)
    assert len(got) == len(ref) == 2
    for (images, _), (batch, bad) in zip(ref, got):
        assert (decoder(batch).int() - images.int()).abs().float().mean() < 0.5
        assert bad.tolist() == [0, 0, 0]
