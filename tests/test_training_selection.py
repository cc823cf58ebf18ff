"""Model selection, the lr schedules, metrics.jsonl appending/truncation and best/ across a resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_data import make_nuisance_dataset, max_abs_diff, one_thread, tiny_settings

from vembed.errors import VembedError
from vembed.evaluation.base import EvalResult
from vembed.settings import load_settings
from vembed.tasks.retrieval import task as retrieval_task
from vembed.training import loop as loop_module
from vembed.training import train
from vembed.training.metrics import MetricsLog
from vembed.training.optim import build_scheduler
from vembed.training.saving import BestStore
from vembed.training.selection import Selection, resolution_warning


def _history(**series):
    """Rows at steps 0, 10, 20, ... with the given metric values."""
    length = len(next(iter(series.values())))
    return [{"kind": "val", "step": 10 * i, **{k: v[i] for k, v in series.items()}} for i in range(length)]


# A small validation set: recall@1 peaks early and noisily, map@r keeps rising.
HISTORY = _history(
    **{
        "recall@1": [0.40, 0.52, 0.60, 0.55, 0.58, 0.59],
        "map@r": [0.20, 0.25, 0.28, 0.30, 0.31, 0.31],
        "top1": [0.30, 0.70, 0.60, 0.65, 0.90, 0.20],
    }
)


def test_selection_picks_the_best_step_of_the_chosen_metric():
    assert Selection("recall@1", smoothing=1).choose(HISTORY)["step"] == 20
    assert Selection("map@r", smoothing=1).choose(HISTORY)["step"] == 50  # tie at 0.31: the later model
    assert Selection("top1", smoothing=1).choose(HISTORY)["step"] == 40  # any metric the validation reports
    assert Selection("recall@1", mode="last").choose(HISTORY)["step"] == 50
    assert Selection("recall@1").choose([]) is None


def test_smoothing_ranks_by_the_mean_of_the_last_validations():
    # recall@1 means over 3: 0.40 .46 .507 .557 .577 .573 -> step 40
    assert Selection("recall@1", smoothing=3).choose(HISTORY)["step"] == 40
    # top1 means over 2: .30 .50 .65 .625 .775 .55 -> step 40
    assert Selection("top1", smoothing=2).choose(HISTORY)["step"] == 40


def test_smoothing_compares_full_windows_only():
    """An early spike (the mean over a window that is still short) does not win; the default is MAP@R
    over 3 validations."""
    history = _history(**{"map@r": [0.12, 0.18, 0.12, 0.12, 0.13, 0.14, 0.15, 0.15]})
    assert Selection().choose(history)["step"] == 70  # full windows: .14 .14 .123 .13 .14 .147
    assert Selection(smoothing=1).choose(history)["step"] == 10
    assert [Selection().choose(history[:n])["step"] for n in (1, 2, 3)] == [0, 10, 20]  # stand-ins


def test_selection_improves_follows_the_history_as_it_grows():
    chosen = [
        row["step"]
        for i, row in enumerate(HISTORY)
        if Selection("recall@1", smoothing=1).improves(HISTORY[: i + 1])
    ]
    assert chosen == [0, 10, 20]


def test_unknown_metric_names_the_reported_ones():
    with pytest.raises(VembedError, match=r"select_metric='top5' is not reported.*recall@1, map@r, top1"):
        Selection("top5").choose(HISTORY)


def test_small_validation_sets_are_warned_about():
    warning = resolution_warning({"num_queries": 144, "recall@1": 0.5}, "recall@1")
    assert "144 queries" in warning and "steps of 0.69 points" in warning
    assert "map@r by up to 0.69 points" in resolution_warning({"num_queries": 144}, "map@r")
    assert resolution_warning({"num_queries": 5000}, "recall@1") is None


# -- schedules -----------------------------------------------------------------------------------------


def _lrs(*overrides, total=12, per_epoch=3):
    settings = load_settings(None, ["train.lr=1.0", "train.warmup_ratio=0", *overrides]).train
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, settings, total_steps=total, steps_per_epoch=per_epoch)
    lrs = []
    for _ in range(total):
        lrs.append(round(optimizer.param_groups[0]["lr"], 6))
        optimizer.step()
        scheduler.step()
    return lrs


def test_step_schedule_multiplies_by_gamma_every_n_epochs():
    assert (
        _lrs("train.scheduler=step", "train.step_epochs=2", "train.step_gamma=0.1") == [1.0] * 6 + [0.1] * 6
    )
    assert _lrs("train.scheduler=step", "train.step_epochs=1,3", "train.step_gamma=0.5") == (
        [1.0] * 3 + [0.5] * 6 + [0.25] * 3
    )


def test_constant_and_cosine_schedules_with_warmup():
    assert _lrs("train.scheduler=constant", "train.warmup_ratio=0.25") == pytest.approx(
        [0, 1 / 3, 2 / 3] + [1] * 9, abs=1e-6
    )
    cosine = _lrs()
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.02


def test_step_schedule_needs_step_epochs(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    settings = load_settings(None, [f"data.train={tmp_path / 'train.jsonl'}", "train.scheduler=step"])
    with pytest.raises(VembedError, match="train.step_epochs"):
        loop_module.check_settings(settings)


# -- metrics.jsonl ---------------------------------------------------------------------------------------


def test_metrics_are_appended_and_truncated_to_the_checkpoint_on_resume(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 7):
        log.append({"kind": "train", "step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')  # a line cut short by a kill
    resumed = MetricsLog(tmp_path)
    resumed.resume(4)
    resumed.append({"kind": "val", "step": 5, "map@r": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", s) for s in range(1, 5)] + [("val", 5)]
    assert resumed.rows == rows


# -- best/ --------------------------------------------------------------------------------------------------


def test_best_store_keeps_what_checkpoints_name_and_discards_newer_states(tmp_path):
    store = BestStore(tmp_path)
    store.save(2, {"w": torch.full((2,), 2.0)}, {"step": 2}, keep=set())
    store.save(4, {"w": torch.full((2,), 4.0)}, {"step": 4}, keep={2})  # a checkpoint still names step 2
    assert store.steps() == [2, 4]
    store.discard_after(3)  # resumed from the checkpoint at step 3
    assert store.steps() == [2] and store.load(2)["w"].tolist() == [2.0, 2.0]
    store.save(6, {"w": torch.full((2,), 6.0)}, {"step": 6}, keep=set())
    assert store.steps() == [6]
    with pytest.raises(VembedError, match="step 2 is missing"):
        store.load(2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection-data")
    return make_nuisance_dataset(root / "train", per_class=4), make_nuisance_dataset(
        root / "val", per_class=2, seed=1
    )


@pytest.fixture()
def scripted(monkeypatch):
    """``scripted({step: map@r})``: the loop's validation reports these values (default 0.1)."""
    current = {"step": 0, "values": {}}
    run_validation = loop_module._Trainer._run_validation

    def tracking(self):
        current["step"] = self.state.step
        return run_validation(self)

    class Scripted:
        name, primary_metric, greater_is_better, metrics = "scripted", "map@r", True, ["recall@1", "map@r"]

        def __call__(self, embedder, **kwargs):
            values = {
                "recall@1": 0.5,
                "map@r": current["values"].get(current["step"], 0.1),
                "num_queries": 16,
            }
            return EvalResult(values, "map@r")

    monkeypatch.setattr(loop_module._Trainer, "_run_validation", tracking)
    monkeypatch.setattr(retrieval_task, "retrieval_validator", lambda *a, **k: Scripted())
    return lambda values: current.update(values=values)


# 4 steps per epoch: validations at 0, 4, 5, 8; checkpoints at 3, 4, 6, 8
OPTIONS = (
    "train.max_steps=8",
    "train.eval_every=5",
    "train.select_smoothing=1",
    "train.checkpoint_every=3",
    "model.projection_dim=8",
)


def test_resume_keeps_the_selected_model_its_checkpoint_names(tiny_model, data, tmp_path, scripted):
    """best/ of step 5 (after the checkpoint at 4) is discarded on resume; step 0's, named by the
    checkpoint, is kept and becomes final/ when no later validation beats it."""
    scripted({0: 0.5, 5: 0.9})
    out = tmp_path / "run"

    def crash(info):
        if info.step == 5:
            raise RuntimeError("simulated crash")

    with one_thread():
        with pytest.raises(RuntimeError):
            train(
                tiny_settings(tiny_model, data[0], out, *OPTIONS, val=data[1]),
                show_progress=False,
                on_step=crash,
            )
        assert sorted(p.name for p in (out / "best").iterdir()) == ["step-0000000", "step-0000005"]
        # the resumed run validates on another set (data.val may change): step 5 scores low this time
        scripted({0: 0.5})
        resumed = tiny_settings(tiny_model, data[0], out, *OPTIONS, "train.resume=true", val=data[1])
        result = train(resumed, show_progress=False)
        assert [row["step"] for row in result.history] == [0, 4, 5, 8]
        assert result.selected == "best" and result.best["step"] == 0
        saved = json.loads((result.final_dir / "vembed.json").read_text())["training"]
        assert saved["step"] == 0 and saved["finished_step"] == 8 and saved["select_metric"] == "map@r"
        assert not (out / "best").exists()
        # final/ holds the untrained model: the same as a run that selects step 0 without a crash
        scripted({0: 0.9})
        reference = train(
            tiny_settings(tiny_model, data[0], tmp_path / "ref", *OPTIONS, val=data[1]), show_progress=False
        )
    assert reference.best["step"] == 0
    mine = load_file(str(result.final_dir / "model.safetensors"))
    assert max_abs_diff(mine, load_file(str(reference.final_dir / "model.safetensors"))) == 0.0


def test_select_last_keeps_the_last_step(tiny_model, data, tmp_path, scripted):
    scripted({0: 0.9})
    with one_thread():
        result = train(
            tiny_settings(tiny_model, data[0], tmp_path / "run", *OPTIONS, "train.select=last", val=data[1]),
            show_progress=False,
        )
    assert result.selected == "last" and result.best is None
    saved = json.loads((result.final_dir / "vembed.json").read_text())["training"]
    assert saved["selected"] == "last" and saved["step"] == 8


def test_the_start_says_what_epochs_and_max_steps_mean():
    from vembed.training.state import TrainState, plan

    epochs = load_settings(None, ["train.epochs=15", "train.batch_size=64"]).train
    assert plan(epochs, TrainState(total_steps=240, steps_per_epoch=16), 1, 1078) == (
        "train.epochs=15: 240 steps of 64 images = 15,360 images "
        "(15 epochs; an epoch is 16 steps, 1,024 of the 1,078 training images)"
    )
    steps = load_settings(None, ["train.max_steps=40", "train.batch_size=64"]).train
    message = plan(steps, TrainState(total_steps=40, steps_per_epoch=16), 2, 1078)
    assert message.startswith("train.max_steps=40: 40 steps of 128 images = 5,120 images (2.5 epochs;")


def test_a_select_metric_typo_fails_before_training_naming_the_reported_metrics(tmp_path):
    from typer.testing import CliRunner

    from vembed.cli import app
    from vembed.training.preflight import check_settings

    records = tmp_path / "train.jsonl"
    records.write_text('{"image": "a.jpg", "label": "x"}\n')
    run = tmp_path / "run"
    args = ["train", "--data", str(records), "--val", str(records), "-o", str(run), "eval.k=1,5"]
    result = CliRunner().invoke(app, [*args, "train.select_metric=recal@1"])
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "train.select_metric='recal@1'" in out and "did you mean 'recall@1'?" in out
    assert out.endswith("it reports: recall@1, recall@5, map@r") and not run.exists()

    def check(*overrides):
        base = [f"data.train={records}", f"train.output_dir={run}"]
        check_settings(load_settings(None, [*base, *overrides]))

    check("train.loss=ce", "train.select_metric=top5")  # a classifier's accuracy is reported too
    with pytest.raises(VembedError, match=r"'top1' .* reports: recall@1, recall@10, recall@100, map@r$"):
        check("train.select_metric=top1")
    check("train.task=segmentation", "train.select_metric=pixel_accuracy")
    with pytest.raises(
        VembedError, match=r"'map@r' .*train.task=segmentation it reports: miou, pixel_accuracy"
    ):
        check("train.task=segmentation", "train.select_metric=map@r")
