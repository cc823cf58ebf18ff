"""vembed export: round trip, LoRA merge, plain-transformers reproduction (the documented lines), ONNX."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import class_image, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.export import export_embedder, export_model
from vembed.inference import embed_records
from vembed.models.factory import create_embedder, save_model
from vembed.models.lora import apply_lora, has_lora
from vembed.settings import LoraSettings, ModelSettings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"
FP32_TOL = 1e-5  # exported float32 model vs source: same weights, same graph
FP16_TOL = 1e-2  # float16 weights: rounding of the weights only (unit-norm embeddings)
ONNX_TOL = 1e-4  # onnxruntime vs PyTorch, float32

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fp32_models(monkeypatch):
    """These tests compare embeddings with fp32 references at 1e-5: keep model.dtype=auto at fp32."""
    monkeypatch.setenv("VEMBED_CPU_BF16", "0")


def _images(folder: Path, n: int = 4) -> list[Path]:
    """Class pictures; one 40x60 so that resizing keeps an exact aspect ratio (28/40*60 = 42)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = class_image(i % 3, i, size=40)
        if i == n - 1:
            img = img.resize((40, 60))
        paths.append(folder / f"img_{i}.png")
        img.save(paths[-1])
    return paths


def _embed(model, paths) -> torch.Tensor:
    embedder = model if not isinstance(model, (str, Path)) else create_embedder(str(model))
    records = [ImageRecord(p) for p in paths]
    return embed_records(embedder, records, num_workers=0, show_progress=False).embeddings


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as training leaves it: settings.yaml, metrics.jsonl and a final/ model folder
    with a projection head (and cls+mean pooling, so pooling and head both matter)."""
    root = tmp_path_factory.mktemp("export")
    base = save_tiny_model(root / "base", "dinov2_with_registers", seed=3)
    torch.manual_seed(0)
    embedder = create_embedder(str(base), ModelSettings(pooling="cls+mean", projection_dim=16))
    run = root / "run"
    save_model(embedder, run / "final")
    (run / "settings.yaml").write_text("model:\n  name: base\n")
    (run / "metrics.jsonl").write_text("")
    return run


def test_export_round_trip_float32(run_dir, tmp_path):
    paths = _images(tmp_path / "img")
    result = export_model(run_dir, tmp_path / "out")
    assert result.model == str(run_dir / "final")
    assert result.max_abs_diff <= FP32_TOL
    files = set(result.files)
    assert {"config.json", "model.safetensors", "vembed.json", "vembed_head.safetensors"} <= files
    assert {"preprocessor_config.json", "README.md", "training_settings.yaml"} <= files
    assert not list((tmp_path / "out").glob("*.bin")) and not list(tmp_path.glob(".out.*"))  # no temp left
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o666 & ~umask}
    source = _embed(run_dir / "final", paths)
    exported = _embed(tmp_path / "out", paths)
    assert exported.shape == (len(paths), 16)
    assert (exported - source).abs().max() <= FP32_TOL
    saved = json.loads((tmp_path / "out" / "vembed.json").read_text())
    assert saved["pooling"] == "cls+mean" and saved["projection_dim"] == 16
    assert saved["export"]["dtype"] == "float32" and saved["export"]["max_abs_diff"] <= FP32_TOL
    assert saved["exported_from"] == str(run_dir)


def test_export_float16_is_close_and_half_the_size(run_dir, tmp_path):
    paths = _images(tmp_path / "img")
    fp32 = export_model(run_dir, tmp_path / "fp32")
    fp16 = export_model(run_dir, tmp_path / "fp16", dtype="float16")
    assert 0 < fp16.max_abs_diff <= FP16_TOL
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    size32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "fp16" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    diff = (_embed(tmp_path / "fp16", paths) - _embed(tmp_path / "fp32", paths)).abs().max()
    assert diff <= FP16_TOL
    assert fp32.max_abs_diff <= FP32_TOL


def test_lora_is_merged_and_matches_the_adapted_model(tmp_path):
    base = save_tiny_model(tmp_path / "base", "dinov2", seed=1)
    embedder = apply_lora(create_embedder(str(base)), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); give the adapters real weights
        for name, param in embedder.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    paths = _images(tmp_path / "img")
    adapted = _embed(embedder, paths)
    plain = _embed(str(base), paths)
    assert (adapted - plain).abs().max() > 1e-2  # the adapters change the embedding

    result = export_embedder(embedder, tmp_path / "out")
    assert has_lora(embedder)  # the caller's model is untouched
    assert result.max_abs_diff <= FP32_TOL
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert not [n for n in names if "lora" in n or "base_layer" in n]
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert (_embed(tmp_path / "out", paths) - adapted).abs().max() <= FP32_TOL


def _documented_snippet(text: str) -> str:
    """The first python block after the 'plain transformers' heading of docs/export.md."""
    section = text[text.index("## vembed's embedding with plain transformers") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_automodel_and_the_documented_lines_reproduce_vembed(run_dir, tmp_path):
    from transformers import AutoModel

    paths = _images(tmp_path / "img")
    export_model(run_dir, tmp_path / "out")
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Dinov2WithRegistersModel"
    assert not any("lora" in n for n, _ in model.named_parameters())

    code = _documented_snippet(DOCS.read_text())
    assert '"models/sop-dinov2-base"' in code and '["a.jpg", "b.jpg"]' in code
    code = code.replace('"models/sop-dinov2-base"', repr(str(tmp_path / "out")))
    code = code.replace('["a.jpg", "b.jpg"]', repr([str(p) for p in paths]))
    scope: dict = {}
    exec(compile(code, str(DOCS), "exec"), scope)
    expected = _embed(tmp_path / "out", paths)
    assert scope["emb"].shape == expected.shape
    assert (scope["emb"] - expected).abs().max() <= FP32_TOL


@pytest.mark.parametrize(
    "family,pooling",
    [("clip", "pooler"), ("siglip", "mean"), ("dinov2", "cls"), ("vit", "cls"), ("vit_google", "mean")],
)
def test_model_card_lines_reproduce_vembed(tmp_path, family, pooling):
    """The README.md the export writes is specialised to the model; its lines give the same embedding."""
    base = save_tiny_model(tmp_path / "base", family)
    embedder = create_embedder(str(base), ModelSettings(pooling=pooling))
    save_model(embedder, tmp_path / "model")
    export_model(tmp_path / "model", tmp_path / "out")
    paths = _images(tmp_path / "img", n=3)
    card = (tmp_path / "out" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('"PATH"', repr(str(tmp_path / "out")))
    code = code.replace('["a.jpg", "b.jpg"]', repr([str(p) for p in paths]))
    scope: dict = {}
    exec(code, scope)
    assert (scope["emb"] - _embed(tmp_path / "out", paths)).abs().max() <= FP32_TOL


def test_onnx_matches_pytorch(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    pytest.importorskip(
        "onnxscript", reason="onnxscript is not installed (the dynamo ONNX exporter needs it)"
    )
    result = export_model(run_dir, tmp_path / "out", onnx=True)
    assert result.onnx_path == tmp_path / "out" / "model.onnx" and result.onnx_path.is_file()
    assert result.onnx_max_abs_diff is not None and result.onnx_max_abs_diff <= ONNX_TOL
    saved = json.loads((tmp_path / "out" / "vembed.json").read_text())
    assert saved["export"]["onnx"]["max_abs_diff"] == result.onnx_max_abs_diff

    # independently: real images, a batch size never traced, preprocessing from the exported folder
    from vembed.data.images import EvalTransform, load_image

    embedder = create_embedder(str(tmp_path / "out"))
    transform = EvalTransform(embedder.spec)
    pixels = torch.stack([transform(load_image(p)) for p in _images(tmp_path / "img", n=5)])
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["embeddings"], {"pixel_values": pixels.numpy()})[0])
    assert got.shape == (5, 16)
    assert (got - embedder.encode(pixels)).abs().max() <= ONNX_TOL


def test_run_without_final_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000010").mkdir(parents=True)
    (run / "settings.yaml").write_text("model: {}\n")
    with pytest.raises(VembedError, match="no final/"):
        export_model(run, tmp_path / "out")
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no final/" in lines[0] and "--resume" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_sources_and_outputs_fail_before_writing(run_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VembedError, match="not a model folder .no config.json. nor a run directory"):
        export_model(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(VembedError, match="no such model folder"):
        export_model(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(VembedError, match="overlaps the source"):
        export_model(run_dir, run_dir / "final" / "exported")
    with pytest.raises(VembedError, match="overlaps the source"):
        export_model(run_dir, run_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(VembedError, match="not a vembed model folder"):
        export_model(run_dir, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(VembedError, match="dtype"):
        export_model(run_dir, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_failed_verification_leaves_the_previous_export(run_dir, tmp_path, monkeypatch):
    """A check that fails after the files were written must not replace a good earlier export."""
    import vembed.export as export_module

    out = tmp_path / "out"
    export_model(run_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setitem(export_module.RELOAD_ATOL, "float32", -1.0)
    with pytest.raises(VembedError, match="differs from the source"):
        export_model(run_dir, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_export_into_the_run_dir_and_json(run_dir, tmp_path):
    out = run_dir / "exported"
    summary = tmp_path / "export.json"
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--json", str(summary)])
    assert result.exit_code == 0, result.output
    data = json.loads(summary.read_text())
    assert data["out_dir"] == str(out) and data["max_abs_diff"] <= FP32_TOL and data["embed_dim"] == 16
    # the export is a model folder every --model option accepts
    assert create_embedder(str(out)).embed_dim == 16


def test_run_settings_choose_the_export_defaults_and_flags_win(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "settings.yaml").write_text("model:\n  name: base\nexport:\n  dtype: float16\n  onnx: false\n")
    assert export_model(run, tmp_path / "a").dtype == "float16"
    assert export_model(run, tmp_path / "b", dtype="float32").dtype == "float32"
    cli = runner.invoke(
        app, ["export", str(run), "--out", str(tmp_path / "c"), "--json", str(tmp_path / "c.json")]
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "c.json").read_text())["dtype"] == "float16"
    (run / "settings.yaml").write_text("export:\n  dtype: int4\n")
    with pytest.raises(VembedError, match="settings.yaml: export"):
        export_model(run, tmp_path / "d")


def test_lora_run_exports_to_the_same_embeddings(tiny_model, tmp_path):
    """End to end: a LoRA run of the real loop, then `vembed export RUN`; the export equals the run's final/."""
    from conftest import make_image_dataset
    from transformers import AutoModel

    from vembed.settings import load_settings
    from vembed.training import train

    data = make_image_dataset(tmp_path / "data", num_classes=4, per_class=4)
    settings = load_settings(
        None,
        values={
            "model.name": str(tiny_model),
            "model.device": "cpu",
            "data.train": str(data),
            "data.num_workers": 0,
            "train.output_dir": str(tmp_path / "run"),
            "train.method": "lora",
            "train.lora.r": 4,
            "train.lr": 5e-2,  # large enough that the merged adapters visibly move the weights
            "train.batch_size": 8,
            "train.max_steps": 3,
        },
    )
    run = train(settings, show_progress=False)
    paths = _images(tmp_path / "img")
    assert (_embed(run.final_dir, paths) - _embed(tiny_model, paths)).abs().max() > 1e-3

    result = runner.invoke(app, ["export", str(run.run_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (_embed(tmp_path / "out", paths) - _embed(run.final_dir, paths)).abs().max() <= FP32_TOL
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    assert (tmp_path / "out" / "training_settings.yaml").read_text() == (
        run.run_dir / "settings.yaml"
    ).read_text()
