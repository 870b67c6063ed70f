"""Semantic segmentation: UPerNet / FCN heads, the segmentor's sliding-window and whole-image
inference, the toy and ADE20K recipes, the mIoU evaluator and bad-input errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec

from itpn_d2.d2 import ITPNBackbone
from itpn_d2.d2.sem_seg_evaluation import ITPNSemSegEvaluator
from itpn_d2.d2.semseg import (EncoderDecoderSegmentor, FCNHead, UPerNetHead,
                               concat_backbone_stages, itpn_feature_shapes,
                               sliding_window_starts)
from itpn_d2.d2.semseg_data import LabelError, SemSegDatasetMapper, read_label_png
from itpn_d2.data.toy import register_toy_datasets
from itpn_d2.modeling import build_itpn

TOY_CONFIG = "configs/toy/upernet_itpn_nano.py"
ADE_CONFIG = "configs/ade20k/upernet_itpn_b.py"


def _toy_cfg(toy_root):
    register_toy_datasets(toy_root)
    return LazyConfig.load(TOY_CONFIG)


def _segmentor(**kwargs):
    """A small itpn_nano UPerNet, built from the toy recipe's model config."""
    cfg = LazyConfig.load(TOY_CONFIG)
    for key, value in kwargs.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


# ------------------------------------------------------------------------------ heads


def test_feature_shapes_follow_the_model_and_concat_option():
    plain = itpn_feature_shapes("itpn_base")
    assert {k: (v.channels, v.stride) for k, v in plain.items()} == {
        "p2": (256, 4), "p3": (256, 8), "p4": (256, 16), "p5": (256, 32)}
    concat = itpn_feature_shapes("itpn_base", concat_stages=True)
    # The published UPerNet in_channels for iTPN-B.
    assert [v.channels for v in concat.values()] == [384, 512, 768, 768]
    assert itpn_feature_shapes("itpn_nano", features=("p4",))["p4"].channels == 64

    # The computed shapes match the real backbone's concatenated features.
    backbone = ITPNBackbone(build_itpn("itpn_nano"),
                            out_features=("p2", "p3", "p4", "p5", "c2", "c3", "c4"))
    feats = concat_backbone_stages(backbone(torch.randn(1, 3, 64, 64)))
    want = itpn_feature_shapes("itpn_nano", concat_stages=True)
    assert {k: (v.shape[1], 64 // v.shape[-1]) for k, v in feats.items()} == \
        {k: (v.channels, v.stride) for k, v in want.items()}


def test_upernet_head_shapes_and_loss():
    shapes = {f"p{i}": ShapeSpec(channels=8 * i, stride=2 ** i) for i in (2, 3, 4, 5)}
    head = UPerNetHead(shapes, num_classes=5, channels=16, norm="BN")
    assert head.in_features == ["p2", "p3", "p4", "p5"] and len(head.ppm) == 4
    feats = {k: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride)
             for k, s in shapes.items()}
    head.eval()
    logits, losses = head(feats)
    assert logits.shape == (2, 5, 64, 64) and losses == {}
    head.train()
    targets = torch.randint(0, 5, (2, 64, 64))
    targets[:, :8] = 255
    _, losses = head(feats, targets)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    # Fully ignored labels give no signal at all (NaN mean over zero pixels is the torch rule).
    aux = FCNHead(shapes, in_feature="p4", num_classes=5, channels=8, norm="BN")
    _, aux_losses = aux(feats, targets)
    assert set(aux_losses) == {"loss_sem_seg_aux"}
    assert aux.loss_weight == 0.4


def test_upernet_loss_value_with_ignored_pixels_and_class_weights():
    """Pinned by hand: loss_weight x the class-weighted mean of -log p(label) over the pixels
    that are not ignored (the weighted mean divides by the weights of those pixels)."""
    torch.manual_seed(0)
    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in (2, 3, 4, 5)}
    head = UPerNetHead(shapes, num_classes=3, channels=8, norm="", dropout=0.0,
                       loss_weight=0.7, class_weight=[0.2, 1.0, 2.0])
    feats = {k: torch.randn(1, 8, 32 // s.stride, 32 // s.stride) for k, s in shapes.items()}
    targets = torch.randint(0, 3, (1, 32, 32))
    targets[0, :10] = 255
    head.eval()
    logits, _ = head(feats)  # the same upsampling as the loss's
    head.train()
    _, losses = head(feats, targets)
    log_p = torch.log_softmax(logits[0], dim=0)
    weights = torch.tensor([0.2, 1.0, 2.0])
    num = den = 0.0
    for y in range(32):
        for x in range(32):
            t = int(targets[0, y, x])
            if t != 255:
                num += -weights[t] * log_p[t, y, x]
                den += weights[t]
    assert losses["loss_sem_seg"].item() == pytest.approx(0.7 * float(num / den), rel=1e-5)


# -------------------------------------------------------------------------- inference


def test_sliding_window_starts():
    assert sliding_window_starts(512, 512, 341) == [0]
    assert sliding_window_starts(683, 512, 341) == [0, 171]
    assert sliding_window_starts(2048, 512, 341) == [0, 341, 682, 1023, 1364, 1536]
    assert sliding_window_starts(128, 96, 64) == [0, 32]


def test_slide_and_whole_inference_agree_when_one_window_covers_the_image():
    model = _segmentor(window_size=96, window_stride=64)
    image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        model.inference_mode = "slide"
        slide = model([{"image": image}])[0]["sem_seg"]
        model.inference_mode = "whole"
        whole = model([{"image": image}])[0]["sem_seg"]
    assert slide.shape == whole.shape == (6, 96, 96)
    torch.testing.assert_close(slide, whole, rtol=1e-4, atol=1e-5)


def test_slide_and_whole_give_the_same_shape_on_larger_and_smaller_images():
    model = _segmentor(window_size=64, window_stride=32)
    for size, out_size in (((96, 160), (120, 200)), ((48, 40), (48, 40))):
        image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
        inputs = [{"image": image, "height": out_size[0], "width": out_size[1]}]
        with torch.no_grad():
            model.inference_mode = "slide"
            slide = model(inputs)[0]["sem_seg"]
            model.inference_mode = "whole"
            whole = model(inputs)[0]["sem_seg"]
        assert slide.shape == whole.shape == (6, *out_size)


def test_sliding_window_averages_overlapping_logits():
    model = _segmentor(window_size=64, window_stride=32)
    calls = []

    def fake_whole(crops):  # window i predicts the constant i for every class
        calls.append(tuple(crops.shape))
        n = crops.shape[0]
        return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 6, 64, 64)

    model.whole_inference = fake_whole
    logits = model.slide_inference(torch.zeros(3, 64, 128))  # windows at x = 0, 32, 64
    assert calls == [(3, 3, 64, 64)]
    row = logits[0, 0]
    assert row[:32].eq(0).all()           # window 0 only
    assert row[32:64].eq(0.5).all()       # windows 0 and 1
    assert row[64:96].eq(1.5).all()       # windows 1 and 2
    assert row[96:].eq(2).all()           # window 2 only
    small = model.slide_inference(torch.zeros(3, 40, 48))  # padded to one 64 x 64 window
    assert small.shape == (6, 40, 48)


def test_segmentor_rejects_heads_that_do_not_fit_and_bad_windows():
    cfg = LazyConfig.load(TOY_CONFIG)
    cfg.model.concat_stages = True
    cfg.model.sem_seg_head.input_shape.concat_stages = False  # head built for the plain pyramid
    with pytest.raises(ValueError, match="sem_seg_head expects feature 'p2' with 64 channels"):
        instantiate(cfg.model)
    cfg = LazyConfig.load(TOY_CONFIG)
    cfg.model.window_size = 100
    with pytest.raises(ValueError, match="multiples of the backbone's size_divisibility 32"):
        instantiate(cfg.model)


def test_concat_stages_model_runs():
    model = _segmentor(concat_stages=True, inference_mode="whole")
    assert model.sem_seg_head.input_shape["p2"].channels == 64 + 32
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}])
    assert out[0]["sem_seg"].shape == (6, 64, 64)


# ---------------------------------------------------------------------------- recipes


def test_toy_recipe_trains_40_iterations_with_falling_loss(toy_root):
    cfg = _toy_cfg(toy_root)
    torch.manual_seed(0)
    np.random.seed(0)
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.lr_multiplier)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    loader = iter(instantiate(cfg.dataloader.train))
    max_iter = 40
    totals = []
    for it in range(max_iter):
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * scheduler(it / max_iter)
        losses = model(next(loader))
        assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert all(np.isfinite(totals))
    # starts at the uniform prediction's loss, (1 + 0.4) * ln 6 = 2.51; falls by 19% in 40
    # iterations at the recipe's lr 1e-3 (the mean of 5 iterations smooths the batch noise)
    first, last = np.mean(totals[:5]), np.mean(totals[-5:])
    assert last < 0.85 * first, totals


def test_full_recipe_instantiates_with_published_settings():
    cfg = LazyConfig.load(ADE_CONFIG)
    model = instantiate(cfg.model)
    assert isinstance(model, EncoderDecoderSegmentor)
    net = model.backbone.net
    assert net.model_name == "itpn_base" and net.model_overrides == {"drop_path_rate": 0.1}
    head, aux = model.sem_seg_head, model.auxiliary_head
    assert head.num_classes == aux.num_classes == 150
    assert head.fuse.out_channels == 768 and head.ignore_value == 255
    assert aux.in_features == ["p4"] and aux.loss_weight == 0.4
    assert [s.channels for s in head.input_shape.values()] == [256] * 4
    assert model.inference_mode == "slide"
    assert model.window_size == (512, 512) and model.window_stride == (341, 341)
    assert model.input_format == "RGB"

    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.dataloader.train.dataset.names == "ade20k_sem_seg_train"
    assert cfg.dataloader.test.dataset.names == "ade20k_sem_seg_val"
    assert cfg.dataloader.train.mapper.augmentations.crop_size == 512
    assert cfg.train.max_iter == 160000 and cfg.train.amp.enabled == torch.cuda.is_available()
    assert cfg.optimizer.lr == 3e-5 and cfg.optimizer.weight_decay == 0.05

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    num_layers = net.backbone.num_layers
    assert lrs[id(head.predictor.weight)] == pytest.approx(3e-5)
    assert lrs[id(net.backbone.patch_embed.proj.weight)] == pytest.approx(3e-5 * 0.9 ** num_layers)

    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) == pytest.approx(1e-6)
    assert sched(1500 / 160000) == pytest.approx(1 - 1500 / 160000, rel=1e-3)
    assert sched(0.5) == pytest.approx(0.5)


def test_pretrained_backbone_and_pyramid_load_verbatim_only_heads_new(tmp_path):
    from itpn_d2.checkpoint import model_metadata, save_checkpoint
    from itpn_d2.d2 import ITPNCheckpointer

    torch.manual_seed(1)
    net = build_itpn("itpn_nano", img_size=128)  # the toy recipe's (pretraining) size
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    save_checkpoint({"model": net.state_dict(), **model_metadata("itpn_nano", {"img_size": 128}),
                     "decoder": {"w": torch.zeros(2)}}, tmp_path / "pretrain.pth")
    model = _segmentor()
    checkpointer = ITPNCheckpointer(model)
    checkpointer.load(str(tmp_path / "pretrain.pth"))
    sd = model.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(sd["backbone.net." + k], v), k
    new = checkpointer.last_report["new"]
    assert new and all(k.startswith(("sem_seg_head.", "auxiliary_head.")) for k in new)


# ------------------------------------------------------------------------- evaluation


def _save_label(path, array, mode="L"):
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    image.save(path)
    return str(path)


def _register_eval_set(name, records, classes=("a", "b", "c")):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=list(classes), ignore_label=255)


def _one_hot(pred, k=3):
    return {"sem_seg": torch.nn.functional.one_hot(torch.as_tensor(pred), k).permute(2, 0, 1)
            .float()}


def test_evaluator_gives_hand_computed_miou_on_png_labels(tmp_path):
    gt1 = [[0, 0, 1, 1], [2, 2, 255, 1]]
    pred1 = [[0, 1, 1, 1], [2, 0, 0, 1]]
    gt2 = [[0, 2], [2, 2]]
    pred2 = [[0, 2], [2, 1]]
    records = [
        {"file_name": "img1.jpg", "sem_seg_file_name": _save_label(tmp_path / "a.png", gt1)},
        {"file_name": "img2.jpg", "sem_seg_file_name": _save_label(tmp_path / "b.png", gt2, "P")},
    ]
    _register_eval_set("_semseg_eval_known", records)
    evaluator = ITPNSemSegEvaluator("_semseg_eval_known", distributed=False)
    evaluator.reset()
    evaluator.process([{"file_name": "img1.jpg"}], [_one_hot(pred1)])
    evaluator.process([{"file_name": "img2.jpg"}], [_one_hot(pred2)])
    res = evaluator.evaluate()["sem_seg"]
    # 11 labelled pixels. Class 0: TP 2, GT 3, predicted 3 -> IoU 2/4, acc 2/3.
    # Class 1: TP 3, GT 3, predicted 5 -> IoU 3/5, acc 1. Class 2: TP 3, GT 5, predicted 3
    # -> IoU 3/5, acc 3/5. The pixel labelled 255 (predicted 0) counts nowhere.
    assert res["mIoU"] == pytest.approx(100 * (0.5 + 0.6 + 0.6) / 3)
    assert res["fwIoU"] == pytest.approx(100 * (0.5 * 3 + 0.6 * 3 + 0.6 * 5) / 11)
    assert res["mACC"] == pytest.approx(100 * (2 / 3 + 1 + 0.6) / 3)
    assert res["pACC"] == pytest.approx(100 * 8 / 11)
    assert res["IoU-a"] == pytest.approx(50.0)


def test_evaluator_equals_the_stock_one_and_turns_labels_of_exif_images(tmp_path):
    """On plain images the result is the stock SemSegEvaluator's (given a numpy-2 safe
    loader); a label drawn on the stored grid of an EXIF-rotated (6) JPEG is turned like the
    image, so a prediction equal to the upright label scores 100."""
    from detectron2.evaluation import SemSegEvaluator

    label = np.array([[0, 0, 1], [2, 255, 1]])  # stored grid 3 x 2 (width x height)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    records = [{"file_name": str(tmp_path / "plain.jpg"),
                "sem_seg_file_name": _save_label(tmp_path / "plain.png", label)},
               {"file_name": str(tmp_path / "rot.jpg"),
                "sem_seg_file_name": _save_label(tmp_path / "rot.png", label)}]
    _register_eval_set("_semseg_eval_exif", records)
    pred = [[0, 1, 1], [2, 0, 0]]
    ours = ITPNSemSegEvaluator("_semseg_eval_exif", distributed=False)
    stock = SemSegEvaluator("_semseg_eval_exif", distributed=False,
                            sem_seg_loading_fn=read_label_png)
    for evaluator in (ours, stock):
        evaluator.reset()
        evaluator.process([{"file_name": records[0]["file_name"]}], [_one_hot(pred)])
    assert ours.evaluate() == stock.evaluate()
    dumped = ITPNSemSegEvaluator("_semseg_eval_exif", distributed=False,
                                 output_dir=str(tmp_path / "eval"))
    dumped.reset()
    dumped.process([{"file_name": records[0]["file_name"]}], [_one_hot(pred)])
    dumped.evaluate()
    rles = json.loads((tmp_path / "eval" / "sem_seg_predictions.json").read_text())
    assert sorted(r["category_id"] for r in rles) == [0, 1, 2]  # one RLE per predicted class

    upright = np.rot90(label, k=-1)  # EXIF 6: turn 90 degrees clockwise
    ours.reset()
    ours.process([{"file_name": records[1]["file_name"]}],
                 [_one_hot(np.where(upright == 255, 0, upright))])
    assert ours.evaluate()["sem_seg"]["mIoU"] == 100.0


def test_stock_label_loader_fails_under_numpy2_ours_does_not(tmp_path):
    from detectron2.evaluation.sem_seg_evaluation import load_image_into_numpy_array

    path = _save_label(tmp_path / "l.png", [[0, 1], [255, 2]])
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(ValueError):
            load_image_into_numpy_array(path, dtype=int)
    assert read_label_png(path, dtype=np.int64).tolist() == [[0, 1], [255, 2]]


def test_evaluator_rejects_bad_labels(tmp_path):
    bad = _save_label(tmp_path / "bad.png", [[0, 7], [1, 2]])
    good = _save_label(tmp_path / "good.png", [[0, 1], [1, 2]])
    records = [{"file_name": "x.jpg", "sem_seg_file_name": bad},
               {"file_name": "y.jpg", "sem_seg_file_name": good},
               {"file_name": "z.jpg", "sem_seg_file_name": str(tmp_path / "missing.png")}]
    _register_eval_set("_semseg_eval_bad", records)
    evaluator = ITPNSemSegEvaluator("_semseg_eval_bad", distributed=False)
    evaluator.reset()
    with pytest.raises(LabelError, match=r"bad\.png has values 7 outside the classes 0\.\.2"):
        evaluator.process([{"file_name": "x.jpg"}], [_one_hot([[0, 0], [0, 0]])])
    with pytest.raises(LabelError, match=r"good\.png is 2x2 but the prediction for y\.jpg is 3x2"):
        evaluator.process([{"file_name": "y.jpg"}], [_one_hot([[0, 0, 0], [0, 0, 0]])])
    with pytest.raises(FileNotFoundError, match=r"missing\.png does not exist"):
        evaluator.process([{"file_name": "z.jpg"}], [_one_hot([[0, 0], [0, 0]])])


# -------------------------------------------------------------------------- bad input


def test_mapper_rejects_bad_labels_sizes_and_missing_files(tmp_path, toy_root):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(image)
    mapper = SemSegDatasetMapper(True, augmentations=[], image_format="RGB", num_classes=6)

    def record(label):
        return {"file_name": str(image), "sem_seg_file_name": str(label)}

    ok = _save_label(tmp_path / "ok.png", np.full((32, 48), 255))
    out = mapper(record(ok))
    assert out["image"].shape == (3, 32, 48) and out["sem_seg"].eq(255).all()
    assert (out["height"], out["width"]) == (32, 48)

    label = np.zeros((32, 48))
    label[0, 0] = 6
    with pytest.raises(LabelError, match=r"range\.png has values 6 outside the classes 0\.\.5"):
        mapper(record(_save_label(tmp_path / "range.png", label)))
    with pytest.raises(LabelError, match=r"small\.png is 40x30 but its image .*img\.png is 48x32"):
        mapper(record(_save_label(tmp_path / "small.png", np.zeros((30, 40)))))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(rgb)
    with pytest.raises(LabelError, match=r"rgb\.png has image mode 'RGB'"):
        mapper(record(rgb))
    with pytest.raises(FileNotFoundError, match=r"nolabel\.png does not exist"):
        mapper(record(tmp_path / "nolabel.png"))
    with pytest.raises(FileNotFoundError, match=r"image file .*noimage\.png does not exist"):
        mapper({"file_name": str(tmp_path / "noimage.png"), "sem_seg_file_name": ok})

    # The toy recipe's mapper on real toy data: labels 0-5 and 255 only, whole images rescaled
    # by 0.75-1 (96-128 px).
    cfg = _toy_cfg(toy_root)
    toy_mapper = instantiate(cfg.dataloader.train.mapper)
    assert toy_mapper.num_classes == 6
    sample = toy_mapper(DatasetCatalog.get("itpn_toy_sem_seg_train")[0])
    assert 96 <= min(sample["sem_seg"].shape) <= max(sample["sem_seg"].shape) <= 128
    assert set(sample["sem_seg"].unique().tolist()) <= set(range(6)) | {255}
