"""itpn_d2.experiments.stages (the cached stages of the demo and the transfer study) and
itpn_d2.eval_results (the evaluation file the train tool writes and the stages read)."""

import io
import json
import math
import sys
from pathlib import Path

import pytest

from itpn_d2.eval_results import EVAL_RESULTS, read_eval_results, write_eval_results
from itpn_d2.experiments import stages
from itpn_d2.errors import UserError
from itpn_d2.experiments.stages import Runner, Stage, require_checkout


def test_eval_results_round_trip_atomically(tmp_path):
    results = {"bbox": {"AP": 13.5, "APl": math.nan}, "sem_seg": {"mIoU": 40.25}}
    path = write_eval_results(tmp_path / "run", results, iteration=20)
    assert path == tmp_path / "run" / EVAL_RESULTS
    back = read_eval_results(tmp_path / "run")
    assert back["iteration"] == 20 and back["bbox"]["AP"] == 13.5
    assert math.isnan(back["bbox"]["APl"]) and back["sem_seg"] == {"mIoU": 40.25}
    write_eval_results(tmp_path / "run", {"bbox": {"AP": 1.0}})  # the next evaluation replaces it
    assert read_eval_results(tmp_path / "run") == {"iteration": None, "bbox": {"AP": 1.0}}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [EVAL_RESULTS]  # no temporary


def test_eval_metrics_reads_the_file_and_names_it(tmp_path):
    stage = Stage("detection", "det", tmp_path, {})
    with pytest.raises(stages.StageError, match=r"stage 'detection': no readable evaluation "
                                                rf"results in .*{EVAL_RESULTS}"):
        stages.eval_metrics(stage, ("bbox",))
    write_eval_results(tmp_path, {"bbox": {"AP": 2.5}, "segm": {"AP": 1.5}}, 4)
    assert stages.eval_metrics(stage, ("bbox", "sem_seg")) == {"bbox": {"AP": 2.5}}
    with pytest.raises(stages.StageError, match=r"stage 'detection': no sem_seg results in "):
        stages.eval_metrics(stage, ("bbox", "sem_seg"), required=("sem_seg",))


def test_eval_history_and_pretrain_summary_read_json_lines(tmp_path):
    # max_iter 20, eval_period 10: after iteration 10 (logged at 9), after the last (at 20)
    rows = [{"iteration": 9, "total_loss": 2.0, "bbox/AP": 5.0},
            {"iteration": 19, "total_loss": 1.0}, {"iteration": 20, "bbox/AP": 7.5, "segm/AP": 3.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert stages.eval_history(tmp_path / "metrics.json", 20) == [
        {"iteration": 10, "value": 5.0}, {"iteration": 20, "value": 7.5}]
    assert stages.eval_history(tmp_path / "metrics.json", 20, "segm") == [
        {"iteration": 20, "value": 3.0}]
    log = [{"epoch": 0, "train_loss": 1.5, "train_mim": 1.0},
           {"epoch": 1, "train_loss": 0.5, "train_mim": 0.25}]
    (tmp_path / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert stages.pretrain_summary(tmp_path, ("loss", "mim")) == {
        "epochs": 2, "first_loss": 1.5, "final_loss": 0.5, "first_mim": 1.0, "final_mim": 0.25}


def test_commands_get_no_pythonpath_and_passive_openmp(tmp_path, monkeypatch):
    """The package is installed: commands import it without a PYTHONPATH from the runner."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    runner = Runner(tmp_path, tmp_path / "logs", progress=False, stream=io.StringIO())
    stage = Stage("env", "env", tmp_path / "env", {})
    code = ("import os, itpn_d2; "
            "print('env', os.environ.get('PYTHONPATH'), os.environ['OMP_WAIT_POLICY'])")
    runner.command(stage, [sys.executable, "-c", code])
    assert "env None PASSIVE" in (tmp_path / "logs" / "env.log").read_text()
    runner.command(stage, [sys.executable, "-c", code], env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert "env None ACTIVE" in (tmp_path / "logs" / "env.log").read_text()


class _Bar:
    def __init__(self, total=None):
        self.total, self.n, self.postfix = total, 0, ""

    def update(self, k):
        self.n += k

    def set_postfix_str(self, s):
        self.postfix = s

    def refresh(self):
        pass


def test_progress_follows_pretraining_and_detectron2_lines():
    bar = _Bar()
    p = stages.pretrain_progress()
    p.feed("pretraining itpn_nano (...); effective batch 32, lr 1e-4, 8 steps/epoch, 96 steps; "
           "device cpu", bar)
    assert bar.total == 96
    p.feed("epoch 0 step 4: loss 1.4941 mim 1.0487 mfm 0.4454 lr 1.296e-05 2.4 img/s", bar)
    assert bar.n == 4 and "1.4941" in bar.postfix

    bar = _Bar(total=20)
    p = stages.d2_train_progress(20)
    p.feed("[d2.utils.events]:  eta: 0:01:58  iter: 9  total_loss: 3.517  loss_cls: 1.2", bar)
    assert bar.n == 10 and "3.517" in bar.postfix
    p.feed("Inference done 11/64. Dataloading: 0.0091 s/iter.", bar)
    assert bar.n == 10 and "11/64" in bar.postfix

    bar = _Bar()
    stages.d2_eval_progress().feed("Inference done 11/64. Dataloading", bar)
    assert (bar.n, bar.total) == (11, 64)


def test_d2_overrides_survive_hydra_parsing():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {"train.init_checkpoint": "", "a.path": "/tmp/with space/it's.pth",
              "b.lr": 1e-3, "c.device": "cpu", "d.flag": True, "e.n": 5,
              "f.path": "/tmp/a-b/c_d.pth"}
    parsed = {o.key_or_group: o.value()
              for o in OverridesParser.create().parse_overrides(stages.d2_overrides(values))}
    assert parsed == values


def test_mean_std_ci():
    s = stages.mean_std_ci([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert math.isnan(stages.mean_std_ci([5.0])["std"])
    assert stages.mean_std_ci([])["n"] == 0
    assert stages.t_quantile_975(100) == 1.96


def test_source_hash_follows_the_code(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    first = stages.source_hash(tmp_path, "pkg")
    assert stages.source_hash(tmp_path, "pkg") == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert stages.source_hash(tmp_path, "pkg") != first


def test_runner_reuses_only_matching_finished_stages(tmp_path):
    calls = []

    def work(stage):
        calls.append(stage.name)
        (stage.out_dir / "out.txt").write_text("x")
        return {"value": len(calls)}

    def make(settings):
        return Stage("s", "stage", tmp_path / "s", settings, outputs=["out.txt"])

    out = io.StringIO()
    runner = Runner(tmp_path, tmp_path / "logs", progress=False, stream=out)
    first = runner.run(make({"a": 1}), work)
    assert calls == ["s"] and not first.reused and first.results == {"value": 1}
    record = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert record["settings"] == {"a": 1} and record["results"] == {"value": 1}

    again = runner.run(make({"a": 1}), work)  # same settings: reused, results from the record
    assert calls == ["s"] and again.reused and again.results == {"value": 1}
    assert "reused" in out.getvalue()

    runner.run(make({"a": 2}), work)  # changed settings: redone in an emptied folder
    assert calls == ["s", "s"]
    (tmp_path / "s" / "out.txt").unlink()  # an output went missing: redone
    runner.run(make({"a": 2}), work)
    assert len(calls) == 3
    forced = Runner(tmp_path, tmp_path / "logs", progress=False, stream=out, force=True)
    forced.run(make({"a": 2}), work)
    assert len(calls) == 4  # --force

    (tmp_path / "s" / "stale.txt").write_text("old")
    (tmp_path / "s" / "stage.json").unlink()  # interrupted run: no record
    runner.run(make({"a": 2}), work)
    assert len(calls) == 5 and not (tmp_path / "s" / "stale.txt").exists()


def test_runner_continues_an_interrupted_resumable_stage(tmp_path):
    """A resumable stage (long pretraining) keeps what an interrupted run with the same settings
    left; other settings, --force and non-resumable stages start from an empty folder."""
    seen = []

    def work(stage):
        seen.append(sorted(p.name for p in stage.out_dir.iterdir()))
        (stage.out_dir / "checkpoint-last.pth").write_text("epoch 3")
        if len(seen) == 1:
            raise KeyboardInterrupt  # the first run is interrupted
        return {}

    def make(settings, resumable=True):
        return Stage("pre", "pretrain", tmp_path / "pre", settings, outputs=["checkpoint-last.pth"],
                     resumable=resumable)

    out = io.StringIO()
    runner = Runner(tmp_path, tmp_path / "logs", progress=False, stream=out)
    with pytest.raises(KeyboardInterrupt):
        runner.run(make({"a": 1}), work)
    assert seen == [[stages.STARTED]] and not (tmp_path / "pre" / "stage.json").exists()
    runner.run(make({"a": 1}), work)  # the same settings: the folder is kept
    assert seen[1] == ["checkpoint-last.pth", stages.STARTED]
    assert "continuing the interrupted run" in out.getvalue()
    assert runner.run(make({"a": 1}), work).reused and len(seen) == 2  # finished: reused

    (tmp_path / "pre" / "stage.json").unlink()
    runner.run(make({"a": 2}), work)  # other settings: emptied
    assert seen[2] == [stages.STARTED]
    (tmp_path / "pre" / "stage.json").unlink()
    Runner(tmp_path, tmp_path / "logs", progress=False, stream=out, force=True).run(
        make({"a": 2}), work)
    assert seen[3] == [stages.STARTED]  # --force redoes it
    (tmp_path / "pre" / "stage.json").unlink()
    runner.run(make({"a": 2}, resumable=False), work)
    assert seen[4] == []  # a stage that cannot continue always starts empty


def test_failed_command_names_stage_command_and_log(tmp_path):
    runner = Runner(tmp_path, tmp_path / "logs", progress=False, stream=io.StringIO())
    stage = Stage("boom", "boom", tmp_path / "boom", {})
    with pytest.raises(stages.StageError, match=r"stage 'boom' failed \(exit status 3\)") as e:
        runner.command(stage, [sys.executable, "-c",
                               "print('about to fail'); import sys; sys.exit(3)"])
    assert "about to fail" in str(e.value) and "boom.log" in str(e.value)
    assert "about to fail" in (tmp_path / "logs" / "boom.log").read_text()


def test_run_parallel_runs_every_stage_numbered_in_order(tmp_path):
    """Both stages run (each while the other is still running: they wait for each other),
    are numbered in the order given, and a failure is raised after both ended."""
    import threading

    barrier = threading.Barrier(2, timeout=60)  # deadlocks (and times out) if run one by one

    def work(stage):
        barrier.wait()
        (stage.out_dir / "out.txt").write_text(stage.name)
        return {"name": stage.name}

    out = io.StringIO()
    runner = Runner(tmp_path, tmp_path / "logs", progress=False, stream=out, total_stages=3)
    runner.run(Stage("first", "first", tmp_path / "first", {}), lambda s: {})
    a, b = (Stage(n, f"stage {n}", tmp_path / n, {}, outputs=["out.txt"]) for n in "ab")
    done = runner.run_parallel([(a, work), (b, work)])
    assert [s.results for s in done] == [{"name": "a"}, {"name": "b"}]
    assert [s.name for s in runner.stages] == ["first", "a", "b"]
    text = out.getvalue()
    assert "[2/3] stage a: done" in text and "[3/3] stage b: done" in text

    def fail(stage):
        raise stages.StageError("b failed")

    c = Stage("c", "c", tmp_path / "c", {}, outputs=["out.txt"])
    d = Stage("d", "d", tmp_path / "d", {})
    with pytest.raises(stages.StageError, match="b failed"):
        runner.run_parallel([(c, lambda s: (s.out_dir / "out.txt").write_text("c") and {}),
                             (d, fail)])
    assert (tmp_path / "c" / "out.txt").read_text() == "c"  # the other stage finished


def test_experiments_refuse_a_folder_that_is_not_a_checkout(tmp_path):
    with pytest.raises(UserError) as err:
        require_checkout(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is not a checkout of iTPN-D2 (no tools/lazyconfig_train_net.py, "
        f"pretrain/main.py, configs/toy): the experiments run the checkout's tools and configs, "
        f"not the installed package; run them from a clone of the repository")
    require_checkout(Path(__file__).resolve().parents[1])  # this checkout: no error


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    from itpn_d2.experiments.stages import file_digest

    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000  # more than one 1 MiB read
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
