"""PretrainConfig (flags <-> checkpoint ``args``), train_step, and resuming a checkpoint written
before the typed configuration."""

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from _pretrain_utils import one_thread  # noqa: F401

from itpn_d2.checkpoint import load_checkpoint, save_checkpoint
from itpn_d2.data.toy import make_toy_dataset
from itpn_d2.modeling import ARCHS
from pretrain.config import PretrainConfig, validate
from pretrain.flags import SettingsError
from pretrain.engine import (DistInfo, Trainer, build_schedule, lr_at, resolve_config,
                             setup_logging, train_step)
from pretrain.main import get_args_parser, main
from pretrain.models import DECODER_SIZES, build_pretrain_model, decoder_size, ema_momentum

OLD = json.loads((Path(__file__).parent / "data" / "pretrain_checkpoint_v1.json").read_text())


def test_config_holds_every_flag_in_the_checkpoint_layout():
    cfg = PretrainConfig.from_namespace(get_args_parser().parse_args([]))
    added = ["overwrite", "cache_images", "norm_pix_loss"]  # flags added after the fixture
    assert [k for k in cfg.to_dict() if k not in added] == list(OLD["args"])
    old = PretrainConfig.from_dict(OLD["args"])
    # checkpoints from before pyramid became a bool read as one
    assert OLD["args"]["pyramid"] == "on" and old.pyramid is True
    assert old.to_dict() == {**OLD["args"], "overwrite": False, "cache_images": False,
                             "pyramid": True, "norm_pix_loss": True}
    assert old.opt_betas == (0.9, 0.95)
    assert PretrainConfig.from_dict({"pyramid": "off"}).pyramid is False
    assert PretrainConfig.from_dict({"model": "itpn_nano", "gone": 1}).model == "itpn_nano"
    with pytest.raises(TypeError, match="new_flag"):  # a flag without a field cannot get lost
        PretrainConfig.from_namespace(argparse.Namespace(**vars(cfg), new_flag=1))
    resolved = resolve_config(cfg.replace(batch_size=8, accum_iter=2, data_path="x"),
                              DistInfo(world_size=1), torch.device("cpu"))
    assert (resolved.eff_batch_size, resolved.lr, resolved.amp, resolved.input_size) == (
        16, 1.5e-4 * 16 / 256, "off", 224)
    assert resolved.amp_dtype is None and cfg.replace(amp="bf16").amp_dtype == torch.bfloat16


def test_the_dataclass_is_the_one_definition_of_flags_defaults_and_ranges(tmp_path, capsys):
    parser = get_args_parser()
    flags = {a.dest: a for a in parser._actions if a.dest not in ("help", "debug")}
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    assert set(flags) == set(fields) - {"world_size", "eff_batch_size"}
    for name, action in flags.items():
        assert action.default == fields[name].default and action.help, name
    assert parser.parse_args(["--pyramid", "off"]).pyramid is False
    assert parser.parse_args(["--norm_pix_loss", "off"]).norm_pix_loss is False
    # a range is checked the same way on the command line and for a config built in code
    with pytest.raises(SystemExit) as exit_:
        main(["--mask_ratio", "1.5", "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --mask_ratio: must be in (0, 1), got 1.5 (see --help)")
    with pytest.raises(SettingsError, match=r"^--mask_ratio: must be in \(0, 1\), got 1.5$"):
        validate(PretrainConfig(mask_ratio=1.5))
    with pytest.raises(SettingsError, match=r"^--opt_betas: must be in \[0, 1\), got 1.0$"):
        build_pretrain_model(PretrainConfig(model="itpn_nano", opt_betas=(0.9, 1.0)))
    with pytest.raises(SettingsError, match=r"^--model: invalid choice 'itpn_huge'"):
        build_pretrain_model({"model": "itpn_huge"})
    with pytest.raises(SettingsError, match="--mfm ema supervises the pyramid levels"):
        validate(PretrainConfig(pyramid=False, mfm="ema"))


def test_decoder_sizes_live_beside_the_arch_table():
    assert list(DECODER_SIZES) == list(ARCHS)
    cfg = PretrainConfig(model="itpn_tiny", decoder_depth=2, mfm_dim=64)
    assert tuple(decoder_size(cfg)) == (256, 2, 8, 64, 8)


def _trainer(batch: int, accum: int) -> Trainer:
    cfg = resolve_config(PretrainConfig(model="itpn_nano", input_size=32, fpn_depth=1, mfm="ema",
                                        batch_size=batch, accum_iter=accum, lr=1.0,
                                        warmup_epochs=1, epochs=4, clip_grad=1.0,
                                        ema_momentum=0.9),
                         DistInfo(), torch.device("cpu"))
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).train()
    # SGD: its update is proportional to the gradient, so equal gradients give equal weights
    # (AdamW's first step, g / |g|, blows rounding differences of tiny gradients up to lr).
    trainer = Trainer(cfg, DistInfo(), torch.device("cpu"), build_schedule(cfg, 8), model,
                      torch.optim.SGD(model.parameters(), lr=0.0),
                      torch.amp.GradScaler("cpu", enabled=False),
                      torch.Generator().manual_seed(1))
    assert trainer.forward is model
    return trainer


def test_train_step_accumulates_micro_batches_like_one_batch():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    one, two = _trainer(4, 1), _trainer(2, 2)
    teacher0 = [p.clone() for p in one.model.teacher.parameters()]
    start = [p.detach().clone() for p in one.model.parameters()]
    out_one = train_step(one, iter([images]), step=1)
    out_two = train_step(two, iter(images.split(2)), step=1)
    # Two micro-batches of 2 draw the same masks as one batch of 4 (one noise stream), and
    # their mean gradient is the big batch's: the same losses, lr and update.
    assert torch.allclose(out_one, out_two, atol=1e-6)
    warmup = one.schedule.warmup_steps
    assert warmup == 2 and one.optimizer.param_groups[0]["lr"] == lr_at(1, 1.0, 0.0, 2, 8)
    moved = [(a - a0).abs().max() for a, a0 in zip(one.model.parameters(), start)]
    assert max(moved) > 1e-3  # the step changed the weights
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # The EMA teacher moved towards the updated student by the step's momentum.
    m = ema_momentum(1, 8, 0.9)
    for t0, t, s in zip(teacher0, one.model.teacher.parameters(),
                        one.model.encoder.backbone.parameters()):
        assert torch.allclose(t, m * t0 + (1 - m) * s.detach(), atol=1e-6)


def test_checkpoint_written_before_the_config_change_auto_resumes(tmp_path):
    images = make_toy_dataset(tmp_path / "toy", num_train=8, num_val=1,
                              image_size=32)["train"]["image_root"]

    def run(out, *extra):
        return main(["--model", "itpn_nano", "--data_path", str(images), "--input_size", "32",
                     "--batch_size", "4", "--num_workers", "0", "--output_dir", str(out),
                     "--vis_images", "0", "--fpn_depth", "1", "--epochs", "2", "--mfm", "ema",
                     "--device", "cpu", "--log_every", "1", *extra])

    full = run(tmp_path / "full")
    run(tmp_path / "part", "--max_steps", "1")
    path = tmp_path / "part" / "checkpoint-last.pth"
    ckpt = load_checkpoint(path)
    assert list(ckpt) == OLD["keys"]
    assert [ckpt["epoch"], ckpt["iter_in_epoch"], ckpt["step"]] == OLD["position"]
    paths = {"data_path": str(images), "output_dir": str(tmp_path / "part")}
    # what the old code wrote for this run, the flags added since, pyramid now a bool
    assert ckpt["args"] == {**OLD["args"], **paths, "overwrite": False, "cache_images": False,
                            "pyramid": True, "norm_pix_loss": True}
    # The fixture's run: this run's networks and states under the old code's `args`.
    ckpt["args"] = {**OLD["args"], **paths}
    save_checkpoint(ckpt, path)
    rest = run(tmp_path / "part", "--auto_resume")
    assert rest.step == full.step == 4
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in full.history][1:]


def test_messages_progress_on_stdout_notes_on_stderr(capsys):
    setup_logging()
    setup_logging()  # idempotent: one handler, one line per message
    logging.getLogger("pretrain.engine").info("epoch 0 done")
    logging.getLogger("pretrain.engine").warning("note: dropped 1 line(s)")
    assert capsys.readouterr() == ("epoch 0 done\n", "note: dropped 1 line(s)\n")
