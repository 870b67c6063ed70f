"""Tests of pretrain/export.py (backbone export, model loading) and the pretrain/visualize.py CLI."""

import pytest
import torch
from PIL import Image

from _pretrain_utils import one_thread  # noqa: F401

from itpn_d2.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from itpn_d2.data.toy import make_toy_dataset
from itpn_d2.errors import UserError
from pretrain.export import export_backbone, load_pretrain_model
from pretrain.main import main
from pretrain.visualize import cli as visualize_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step itpn_nano run at 64 px with the EMA teacher: (checkpoint, image files)."""
    root = tmp_path_factory.mktemp("export_toy")
    images = make_toy_dataset(root / "toy", num_train=4, num_val=1, image_size=64)["train"]
    out = root / "run"
    main(["--model", "itpn_nano", "--data_path", str(images["image_root"]), "--input_size", "64",
          "--batch_size", "4", "--num_workers", "0", "--output_dir", str(out), "--epochs", "1",
          "--max_steps", "1", "--vis_images", "0", "--device", "cpu", "--fpn_depth", "1",
          "--mfm", "ema"])
    return out / "checkpoint-last.pth", sorted(images["image_root"].iterdir())


def test_export_backbone_writes_the_encoder_and_metadata(run, tmp_path):
    ckpt, _ = run
    out = export_backbone(str(ckpt), str(tmp_path / "backbone.pth"))
    written = load_checkpoint(tmp_path / "backbone.pth")
    assert set(written) == set(out) == {"model", "model_name", "model_overrides", "pixel_mean",
                                        "pixel_std", "channel_order", "format_version",
                                        "matching_heuristics"}
    assert written["model_name"] == "itpn_nano" and written["model_overrides"]["fpn_depth"] == 1
    assert not {"drop_path_rate", "use_checkpoint"} & set(written["model_overrides"])
    source = load_checkpoint(ckpt)["model"]
    model, _ = model_from_checkpoint(written)
    assert model.state_dict().keys() == source.keys()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())


def test_export_backbone_errors(run, tmp_path):
    ckpt, _ = run
    bare = tmp_path / "bare.pth"
    torch.save({"model": load_checkpoint(ckpt)["model"]}, bare)
    with pytest.raises(CheckpointError, match=f"^{bare} has no model metadata \\(model_name\\); "
                                              f"convert published checkpoints with "
                                              f"itpn-convert-checkpoint$"):
        export_backbone(str(bare), str(tmp_path / "out.pth"))
    with pytest.raises(UserError, match=f"^output {tmp_path} is a folder; give a file name"):
        export_backbone(str(ckpt), str(tmp_path))
    before = ckpt.read_bytes()
    with pytest.raises(UserError, match=f"^output {ckpt} is the input checkpoint; .* give another "
                                        f"file name$"):
        export_backbone(str(ckpt), str(ckpt))
    assert ckpt.read_bytes() == before


def test_load_pretrain_model_loads_encoder_and_decoder_only(run, tmp_path):
    ckpt, _ = run
    model, args = load_pretrain_model(ckpt)
    saved = load_checkpoint(ckpt)
    assert saved["mfm_heads"] and saved["teacher"]  # trained with MFM heads and an EMA teacher
    assert not model.training and args["mfm"] == "none" and model.teacher is None
    assert len(model.mfm_heads) == 0 and args["input_size"] == 64
    for module, key in ((model.encoder, "model"), (model.decoder, "decoder")):
        assert all(torch.equal(v, saved[key][k]) for k, v in module.state_dict().items())
    export_backbone(str(ckpt), str(tmp_path / "backbone.pth"))
    with pytest.raises(CheckpointError, match="has no pixel decoder: it is not a pretraining "
                                              "checkpoint of itpn-pretrain"):
        load_pretrain_model(tmp_path / "backbone.pth")


def test_load_pretrain_model_reconstructs_with_the_runs_mim_target(run, tmp_path):
    """The target the decoder was trained on comes from the checkpoint; checkpoints written
    before --norm_pix_loss existed were trained with norm_pix."""
    ckpt, _ = run
    saved = load_checkpoint(ckpt)
    assert saved["args"]["norm_pix_loss"] is True and load_pretrain_model(ckpt)[0].norm_pix_loss
    for value, expected in ((False, False), (None, True)):
        args = {k: v for k, v in saved["args"].items() if k != "norm_pix_loss"}
        if value is not None:
            args["norm_pix_loss"] = value
        path = tmp_path / f"ckpt_{value}.pth"
        torch.save({**saved, "args": args}, path)
        assert load_pretrain_model(path)[0].norm_pix_loss is expected


def test_visualize_cli_writes_the_grid_and_reports_errors(run, tmp_path, capsys):
    ckpt, files = run
    out = tmp_path / "grid.png"
    assert visualize_cli([str(ckpt), str(files[0]), str(files[1]), "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 64 + 2 * 2, 2 * 64 + 2)  # 3 columns, 2 rows, 2 px gaps
    capsys.readouterr()
    assert visualize_cli([str(ckpt), str(files[0]), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path} is a folder; give a file")
