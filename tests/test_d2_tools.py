"""tools/lazyconfig_train_net.py (train, resume, eval-only), visualize_predictions, analyze_model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from itpn_d2.checkpoint import model_metadata, save_checkpoint  # noqa: E402
from itpn_d2.modeling import build_itpn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = "configs/toy/mask_rcnn_itpn_nano.py"


def pretrain_checkpoint(tmp, toy_root):
    """A real pretrain/main.py checkpoint (one step) if the CLI exists, else one of the same
    layout built here."""
    if (ROOT / "pretrain" / "main.py").exists():
        from pretrain.main import main as pretrain_main

        out = tmp / "pretrain"
        pretrain_main(["--model", "itpn_nano", "--max_steps", "1", "--batch_size", "2",
                       "--num_workers", "0", "--vis_images", "0", "--epochs", "1",
                       "--warmup_epochs", "0", "--data_path", str(toy_root / "images" / "train"),
                       "--input_size", "128",  # the toy recipes' TOY_IMAGE_SIZE
                       "--output_dir", str(out)])
        (path,) = out.glob("checkpoint-last.pth")
        return path
    net = build_itpn("itpn_nano", img_size=128)
    path = tmp / "pretrain.pth"
    save_checkpoint({"model": net.state_dict(), **model_metadata("itpn_nano", {"img_size": 128}),
                     "decoder": {"w": torch.zeros(2)}, "teacher": net.state_dict()}, path)
    return path


def import_tool(name):
    """Import ``tools/<name>.py`` as a module without putting tools/ on sys.path."""
    import importlib.util

    key = f"_itpn_tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def run_tool(args, toy_root, timeout=600, env=None):
    env = {**os.environ, "ITPN_TOY_ROOT": str(toy_root), "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-W", "ignore", "tools/lazyconfig_train_net.py",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_root):
    """20 iterations on the toy dataset from a pretraining checkpoint."""
    tmp = tmp_path_factory.mktemp("d2_train")
    ckpt = pretrain_checkpoint(tmp, toy_root)
    out = tmp / "out"
    proc, log = run_tool(["--config-file", TOY, "--num-gpus", "1", "train.max_iter=20",
                          f"train.output_dir={out}", f"train.init_checkpoint={ckpt}",
                          "train.checkpointer.period=10", "train.eval_period=0",
                          "dataloader.train.total_batch_size=1"], toy_root)
    assert proc.returncode == 0, log[-4000:]
    return {"out": out, "log": log, "ckpt": ckpt}


def test_train_20_iterations_from_pretraining(trained):
    log, out = trained["log"], trained["out"]
    assert "Starting training from iteration 0" in log
    assert "loaded: backbone" in log and "loaded: pyramid" in log and "newly initialised" in log
    assert "skipped (not in detector)" in log and "decoder" in log
    assert "NO feature pyramid" not in log
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [m for m in metrics if "total_loss" in m]
    assert losses[-1]["iteration"] == 19
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in losses)
    assert "eta:" in log and "lr:" in log  # CommonMetricPrinter
    assert (out / "model_0000009.pth").exists() and (out / "model_final.pth").exists()
    assert list(out.glob("events.out.tfevents.*"))  # TensorBoard writer


def test_same_seed_fine_tunings_log_identical_losses(toy_root, tmp_path):
    """Two 12-iteration toy Mask R-CNN runs with one seed on one CPU thread: every logged loss
    equal at every iteration (what makes the transfer study's paired seeds paired)."""
    def losses(out):
        proc, log = run_tool(["--config-file", TOY, "train.max_iter=12", "train.log_period=1",
                              "train.seed=7", "train.device=cpu", "train.eval_period=0",
                              "train.checkpointer.period=100", f"train.output_dir={out}",
                              "dataloader.train.total_batch_size=1"], toy_root,
                             env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        assert proc.returncode == 0, log[-4000:]
        rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
        return {r["iteration"]: {k: v for k, v in r.items()
                                 if k == "total_loss" or k.startswith("loss_")}
                for r in rows if "total_loss" in r}

    first, second = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(first) == list(range(12))
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= \
        set(first[0])
    assert first == second


def test_pretrain_main_checkpoint_loads_verbatim(trained):
    """The pretraining checkpoint used above (pretrain/main.py's when it exists) loads with no
    override: every backbone and pyramid tensor equal, only heads newly initialised."""
    from itpn_d2.checkpoint import load_checkpoint
    from itpn_d2.d2 import ITPNCheckpointer

    model = instantiate(LazyConfig.load(str(ROOT / TOY)).model)
    checkpointer = ITPNCheckpointer(model)
    checkpointer.load(str(trained["ckpt"]))
    pretrained = load_checkpoint(trained["ckpt"])["model"]
    sd = model.state_dict()
    net_keys = [k for k in sd if k.startswith("backbone.net.")]
    assert len(net_keys) == len(pretrained)
    for k in net_keys:
        assert torch.equal(sd[k], pretrained[k[len("backbone.net."):]]), k
    assert checkpointer.last_report["new"]
    assert all(k.startswith(("proposal_generator.", "roi_heads."))
               for k in checkpointer.last_report["new"])
    assert {"decoder", "teacher"} <= set(checkpointer.last_report["skipped"])


def tool_main(argv):
    """Run the train tool in this process (cheaper than a subprocess)."""
    tool = import_tool("lazyconfig_train_net")
    from detectron2.engine import default_argument_parser

    return tool.main(default_argument_parser().parse_args(argv))


def test_resume_continues_from_last_checkpoint(trained, toy_root, monkeypatch):
    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    out = trained["out"]
    tool_main(["--config-file", str(ROOT / TOY), "--resume", "train.max_iter=22",
               f"train.output_dir={out}", "train.checkpointer.period=10", "train.eval_period=0",
               "dataloader.train.total_batch_size=1"])
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 20" in log
    assert "trainer state" in log  # optimizer / scheduler / iteration restored with the model
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 21


def test_resume_from_an_earlier_checkpoint_logs_each_iteration_once(trained, toy_root, tmp_path,
                                                                     monkeypatch):
    """Iterations logged after the checkpoint resumed from are trained again: their old
    metrics.json lines go, so every iteration appears once."""
    import shutil

    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    (out / "last_checkpoint").write_text("model_0000009.pth")  # as if killed after it
    before = [json.loads(line)["iteration"] for line in (out / "metrics.json").open()]
    assert max(before) >= 19  # (the other resume test may have trained on)
    tool_main(["--config-file", str(ROOT / TOY), "--resume", "train.max_iter=12",
               f"train.output_dir={out}", "train.checkpointer.period=10", "train.eval_period=0",
               "train.log_period=1", "dataloader.train.total_batch_size=1"])
    after = [json.loads(line)["iteration"] for line in (out / "metrics.json").open()]
    assert after == sorted(set(after)) and after[-1] == 11
    assert [i for i in after if i < 10] == [i for i in before if i < 10]


def test_eval_only_prints_coco_ap_tables(trained, toy_root):
    proc, log = run_tool(["--config-file", TOY, "--eval-only",
                          f"train.init_checkpoint={trained['out'] / 'model_final.pth'}",
                          f"train.output_dir={trained['out'] / 'eval'}",
                          # fewer proposals and detections: a quicker CPU evaluation
                          "model.proposal_generator.post_nms_topk=[1000,100]",
                          "model.roi_heads.box_predictor.test_topk_per_image=20",
                          # a model of a few iterations may score every box below the default
                          # 0.05; the tables need predictions, whatever their quality
                          "model.roi_heads.box_predictor.test_score_thresh=0.0"], toy_root)
    assert proc.returncode == 0, log[-4000:]
    for task in ("bbox", "segm"):
        assert f"Evaluation results for {task}" in proc.stdout
    assert "|  AP   |  AP50  |  AP75  |  APs  |  APm  |  APl  |" in proc.stdout
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout


def test_train_tool_bad_inputs(toy_root, tmp_path, monkeypatch):
    from itpn_d2.checkpoint import CheckpointError
    from itpn_d2.d2.data import DatasetError

    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    common = ["--config-file", str(ROOT / TOY), "--eval-only", f"train.output_dir={tmp_path}"]
    with pytest.raises(DatasetError, match="dataset 'itpn_toy_vall' is not registered; did you "
                                           "mean itpn_toy_val"):
        tool_main(common + ["dataloader.test.dataset.names=itpn_toy_vall"])
    bad = tmp_path / "bad.pth"
    save_checkpoint({"model": build_itpn("itpn_nano", fpn_depth=1).state_dict(),
                     **model_metadata("itpn_nano", {"fpn_depth": 1})}, bad)
    with pytest.raises(CheckpointError, match=r"(?s)does not fit the model's backbone/pyramid.*"
                                              r"pyramid\.fuse8\.1"):
        tool_main(common + [f"train.init_checkpoint={bad}"])
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        tool_main(common + [f"train.init_checkpoint={tmp_path / 'missing.pth'}"])


def test_visualize_predictions(trained, toy_root, tmp_path, monkeypatch):
    visualize_predictions = import_tool("visualize_predictions")

    monkeypatch.setenv("ITPN_TOY_ROOT", str(toy_root))
    visualize_predictions.main(["--config-file", str(ROOT / TOY), "--checkpoint",
                                str(trained["out"] / "model_final.pth"), "--num-images", "2",
                                "--output", str(tmp_path / "vis"), "--score-threshold", "0.0"])
    pngs = sorted((tmp_path / "vis").glob("*.png"))
    assert len(pngs) == 2
    from PIL import Image

    assert Image.open(pngs[0]).size == (128, 128)
    # Own images (class names from the config's test dataset).
    visualize_predictions.main(["--config-file", str(ROOT / TOY), "--checkpoint",
                                str(trained["out"] / "model_final.pth"), "--input", str(pngs[0]),
                                "--output", str(tmp_path / "vis2")])
    assert len(list((tmp_path / "vis2").glob("*.png"))) == 1
    with pytest.raises(FileNotFoundError, match="nope.png"):
        visualize_predictions.main(["--config-file", str(ROOT / TOY), "--input",
                                    str(tmp_path / "nope.png")])


def test_analyze_model_counts_attention():
    analyze_model = import_tool("analyze_model")

    cfg = LazyConfig.load(str(ROOT / TOY))
    params, backbone_flops, flops, table = analyze_model.analyze(cfg, 64, 64)
    assert 2e6 < params < 3e6 and 0 < backbone_flops < flops
    assert "backbone.net" in table and "roi_heads" in table
    # The attention handle counts q @ k^T and attn @ v.
    from fvcore.nn import FlopCountAnalysis

    class Attn(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    flops = FlopCountAnalysis(Attn(), (torch.zeros(2, 4, 16, 32),))
    flops.set_op_handle("aten::scaled_dot_product_attention", analyze_model.sdpa_flop_jit)
    assert flops.total() == 2 * (2 * 4) * 16 * 16 * 32
