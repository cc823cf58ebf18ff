"""``vembed`` as the docs-commands sandbox runs it: the real CLI with the network answered locally.

Started by the ``vembed`` script ``docs_harness.build_sandbox`` puts first on PATH. It replaces only
what would leave the machine (model downloads, kagglehub, urllib) and appends the harness' SHRINK
settings; everything else is the installed vembed. Tables: ``docs_harness``.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docs_harness as h  # noqa: E402

SANDBOX = Path(os.environ["VEMBED_DOCS_SANDBOX"])
STANDINS = SANDBOX / "standins"


def tiny_model(family: str) -> Path:
    from conftest import save_tiny_model
    from dual_helpers import save_tiny_dual

    folder = STANDINS / "models" / family
    if not (folder / "config.json").is_file():
        if family in ("clip", "siglip"):  # the hub's CLIP / SigLIP checkpoints hold both towers
            save_tiny_dual(folder, family=family)
        else:
            save_tiny_model(folder, family=family)
    return folder


def patch_models() -> None:
    from vembed.models import loader
    from vembed.models.registry import REGISTRY

    real = loader.resolve_ref

    def resolve_ref(model):
        text = str(model)
        if not Path(text).expanduser().exists():
            family = None
            if text in REGISTRY:
                family = REGISTRY[text].family
            else:
                by_source = {spec.source: spec.family for spec in REGISTRY.values()}
                family = by_source.get(text) or h.HUB_MODELS.get(text)
                if family is None and loader.looks_like_hub_id(text):
                    raise SystemExit(
                        f"docs harness: hub id {text!r} has no stand-in; add it to HUB_MODELS in "
                        "tests/docs_harness.py"
                    )
            if family is not None:
                return loader.ModelRef(text, "folder", str(tiny_model(family)))
        return real(model)

    loader.resolve_ref = resolve_ref


def patch_network() -> None:
    import urllib.error
    import urllib.request

    def dataset_download(handle, *args, **kwargs):
        if handle not in h.KAGGLE:
            raise SystemExit(f"docs harness: Kaggle handle {handle!r} has no stand-in; add it to KAGGLE")
        return str(h.build_dataset(h.KAGGLE[handle], STANDINS / "kaggle" / handle.replace("/", "__")))

    try:
        import kagglehub

        kagglehub.dataset_download = dataset_download
    except ImportError:
        pass

    class Response(io.BytesIO):
        def __init__(self, data: bytes):
            super().__init__(data)
            self.headers = {"Content-Length": str(len(data))}
            self.status = 200

    def urlopen(url, *args, **kwargs):
        url = getattr(url, "full_url", url)
        if url not in h.URLS:
            raise urllib.error.URLError(f"docs harness: no stand-in for {url}; add it to URLS")
        return Response(h.build_dataset(h.URLS[url], STANDINS / "urls").read_bytes())

    urllib.request.urlopen = urlopen


def patch_sizes() -> None:
    import vembed.settings as settings_module

    real = settings_module.load_settings

    def load_settings(recipe=None, overrides=None, values=None):
        return real(recipe, [*(overrides or []), *h.SHRINK], values)

    import vembed.cli  # noqa: F401  (imports every command module)
    import vembed.quickstart as quickstart

    for module in list(sys.modules.values()):  # every `from vembed.settings import load_settings`
        if (
            getattr(module, "__name__", "").startswith("vembed")
            and getattr(module, "load_settings", None) is real
        ):
            module.load_settings = load_settings

    real_run = quickstart.run_quickstart

    def run_quickstart(out="runs/quickstart", options=None):
        options = options or quickstart.QuickstartOptions()
        for key, value in h.QUICKSTART.items():
            setattr(options, key, value)
        return real_run(out, options)

    quickstart.run_quickstart = run_quickstart


def main() -> None:
    patch_models()
    patch_network()
    patch_sizes()
    from vembed.cli import main as vembed_main

    sys.argv[0] = "vembed"
    vembed_main()


if __name__ == "__main__":
    main()
