"""``vembed eval fewshot`` / ``knn`` / ``linear-probe``: embeddings measured by classification."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from vembed.cli.app import quiet_transformers, settings_from
from vembed.cli.evaluate import MODEL_HELP, check_models, eval_app, eval_model
from vembed.console import log
from vembed.errors import VembedError
from vembed.io import write_json, write_text
from vembed.settings import Settings, settings_to_yaml

CONFIG_HELP = "YAML recipe."
OVERRIDES_HELP = "key=value settings overrides."


@eval_app.command("fewshot")
def fewshot_command(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: model.name."),
    data: Path = typer.Option(
        None,
        "--data",
        "-d",
        help="Prepared folder with seen_/unseen_ support and query files (`prepare ... --shots K`).",
    ),
    support: Path = typer.Option(
        None, "--support", help="One support file (with --query) instead of --data."
    ),
    query: Path = typer.Option(None, "--query", help="Its query file."),
    k: str = typer.Option(None, "--k", help="Support images per class, e.g. 1,3,10 (eval.shots)."),
    episodes: int = typer.Option(
        None, "--episodes", help="N > 1: draw k supports per class at random N seeded times; mean ± std."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the episodes' draws."),
    dims: str = typer.Option(None, "--dims", help="Also score these truncated widths, e.g. 64,128,768."),
    json_out: Path = typer.Option(None, "--json", help="Write the results here as JSON."),
    compare: list[str] = typer.Option(
        None, "--compare", help="Also evaluate these models (repeatable); the table shows deltas."
    ),
    plot: Path = typer.Option(
        None, "--plot", help="PNG: accuracy vs k per model, and prototype similarity heat maps."
    ),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """k-shot prototype accuracy (top-1/top-5) on seen and unseen classes, side by side."""
    from vembed.evaluation.base import parse_dims
    from vembed.evaluation.class_report import fewshot_table
    from vembed.evaluation.compare import compare as compare_models
    from vembed.evaluation.compare import comparison_json
    from vembed.evaluation.fewshot import FewShotEvaluator, fewshot_sets, read_fewshot_sets
    from vembed.evaluation.options import embed_options

    settings = settings_from(config, overrides, model__name=model, eval__shots=k, eval__episodes=episodes)
    sets = fewshot_sets(data, support, query)
    widths = parse_dims(dims)
    models = _check_models(settings, compare)
    evaluator = FewShotEvaluator(
        read_fewshot_sets(sets, **_records(settings)),
        ks=settings.eval.shots,
        episodes=settings.eval.episodes,
        seed=seed,
        dims=widths,
        embed=embed_options(settings),
    )
    result = compare_models(
        models,
        evaluator,
        load=lambda name: eval_model(name, settings),
        announce=lambda name: f"k-shot evaluation of [bold]{name}[/] on {', '.join(sets)}",
    )
    reports = result.reports()
    Console().print(fewshot_table(reports))
    if plot is not None:
        from vembed.evaluation.plots import plot_fewshot

        log(f"wrote {plot_fewshot(reports, plot)}")
    _write(json_out, comparison_json(reports), settings)


@eval_app.command("knn")
def knn_command(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: model.name."),
    train: Path = typer.Option(None, "--train", help="Labelled reference records. Default: data.train."),
    test: Path = typer.Option(None, "--test", help="Labelled records to classify. Default: data.test."),
    k: int = typer.Option(None, "--k", help="Neighbours that vote (eval.knn_k, default 20)."),
    json_out: Path = typer.Option(None, "--json", help="Write the results here as JSON."),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Weighted kNN classification: top-1 and per-class accuracy of --test against --train."""
    from vembed.evaluation.base import read_eval_records
    from vembed.evaluation.class_report import accuracy_table
    from vembed.evaluation.compare import compare
    from vembed.evaluation.knn import KnnEvaluator
    from vembed.evaluation.options import embed_options

    settings = settings_from(config, overrides, model__name=model, eval__knn_k=k)
    train, test = (
        _split(train, settings.data.train, "--train", "data.train"),
        _split(test, settings.data.test, "--test", "data.test"),
    )
    models = _check_models(settings, None)
    records = _records(settings)
    evaluator = KnnEvaluator(
        read_eval_records(train, **records),
        read_eval_records(test, **records),
        k=settings.eval.knn_k,
        embed=embed_options(settings),
    )
    result = compare(models, evaluator, load=lambda name: eval_model(name, settings)).first.report
    rows = [("top-1 %", f"{100 * result.top1:.2f}"), ("k", str(result.k)), ("queries", str(result.queries))]
    Console().print(accuracy_table(f"kNN of {result.model} on {test}", rows, result.per_class))
    _write(json_out, result.to_json(), settings)


@eval_app.command("linear-probe")
def linear_probe_command(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: model.name."),
    train: Path = typer.Option(None, "--train", help="Records to fit on. Default: data.train."),
    val: Path = typer.Option(None, "--val", help="Records that choose C. Default: data.val."),
    test: Path = typer.Option(None, "--test", help="Records to score. Default: data.test."),
    json_out: Path = typer.Option(None, "--json", help="Write the results here as JSON."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Embedding cache folder (eval.cache_dir)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Embed every split afresh; write no cache."),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Logistic regression on frozen embeddings (C chosen on --val), test top-1 and per-class accuracy."""
    from vembed.evaluation.base import read_eval_records
    from vembed.evaluation.cache import EmbeddingCache
    from vembed.evaluation.class_report import accuracy_table
    from vembed.evaluation.compare import compare
    from vembed.evaluation.linear_probe import LinearProbeEvaluator
    from vembed.evaluation.options import embed_options

    settings = settings_from(config, overrides, model__name=model, eval__cache_dir=cache_dir)
    paths = [
        _split(given, default, flag, key)
        for given, default, flag, key in (
            (train, settings.data.train, "--train", "data.train"),
            (val, settings.data.val, "--val", "data.val"),
            (test, settings.data.test, "--test", "data.test"),
        )
    ]
    models = _check_models(settings, None)
    cache = None if no_cache else EmbeddingCache(settings.eval.cache_dir)
    evaluator = LinearProbeEvaluator(
        *(read_eval_records(path, **_records(settings)) for path in paths),
        embed=embed_options(settings),
        seed=settings.train.seed,
        cache=cache,
        model_settings=settings.model,
        load=lambda name: eval_model(name, settings),
    )
    result = compare(models, evaluator).first.report  # the evaluator loads the model, if it must
    hits = [name for name, hit in result.cached.items() if hit]
    if hits:
        log(f"embeddings of {', '.join(hits)} read from the cache ({cache.folder})")
    s = result.score
    rows = [
        ("top-1 %", f"{100 * s.top1:.2f}"),
        ("C (chosen on val)", f"{s.c:g}"),
        ("val top-1 % at C", f"{100 * s.val_top1[s.c]:.2f}"),
        ("queries", str(s.queries)),
    ]
    Console().print(accuracy_table(f"linear probe of {result.model} on {paths[2]}", rows, s.per_class))
    _write(json_out, result.to_json(), settings)


def _split(given: Path | None, default: Path | None, flag: str, key: str) -> Path:
    path = given or default
    if path is None:
        raise VembedError(f"no {flag[2:]} records: pass {flag} FILE.jsonl (or set {key})")
    return path


def _check_models(settings: Settings, compare: list[str] | None) -> list[str]:
    quiet_transformers()
    models = [settings.model.name, *(compare or [])]
    check_models(models)
    return models


def _records(settings: Settings) -> dict:
    return {"image_root": settings.data.image_root, "skip_bad": settings.data.skip_bad}


def _write(json_out: Path | None, data: dict, settings: Settings) -> None:
    if json_out is None:
        return
    write_json(json_out, data)
    write_text(json_out.with_suffix(".settings.yaml"), settings_to_yaml(settings))
    log(f"wrote {json_out}")
