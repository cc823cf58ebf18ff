"""``vembed serve`` as users run it: a real server process on a free loopback port, real HTTP (httpx).

Its answers must equal ``vembed embed --jsonl`` and ``vembed search --jsonl`` for the same images; a
load test checks every answer under concurrency; every bad input gets its 4xx and one line of JSON.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import class_image, make_image_dataset, save_tiny_model
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.index.store import open_store

httpx = pytest.importorskip(
    "httpx", reason="the serve tests need vembed[serve] (pip install 'vembed[serve]')"
)
pytest.importorskip("fastapi", reason="the serve tests need vembed[serve] (pip install 'vembed[serve]')")
pytest.importorskip("uvicorn", reason="the serve tests need vembed[serve] (pip install 'vembed[serve]')")

runner = CliRunner()
F32 = "model.dtype=float32"


def cli(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vembed serve ...`` in a subprocess, ready once /health answers."""

    def __init__(self, *args, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "vembed", "serve", *map(str, args), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}:\n" + "".join(self.output))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health:\n" + "".join(self.output))

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_model(root / "model")
    make_image_dataset(root / "data", num_classes=3, per_class=4)
    images = sorted((root / "data" / "images").rglob("*.png"))
    cli("embed", root / "data" / "images", "--model", model, "--out", root / "store", "-q", F32)
    lines = cli("embed", root / "data" / "images", "--model", model, "--jsonl", "-q", F32).stdout.splitlines()
    expected = {row["path"]: torch.tensor(row["embedding"]) for row in map(json.loads, lines)}
    expected = {str(Path(p).resolve()): v for p, v in expected.items()}
    server = Server(
        model, "--store", root / "store", F32, "--max-images", 8, "--max-body-mb", 1,
        "--allow-root", root / "data",
    )  # fmt: skip
    yield {
        "root": root,
        "model": model,
        "store": root / "store",
        "images": images,
        "expected": expected,
        "server": server,
    }
    assert server.stop() in (0, -signal.SIGTERM), "".join(server.output)
    assert "Traceback" not in "".join(server.output)


def expected_for(setup, path: Path) -> torch.Tensor:
    return setup["expected"][str(path.resolve())]


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=0).item()


def test_embed_multipart_equals_vembed_embed_in_request_order(setup):
    chosen = [setup["images"][i] for i in (5, 0, 11)]
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in chosen]
    r = httpx.post(setup["server"].url + "/v1/embed", files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 32 and len(body["embeddings"]) == 3 and body["model"] == str(setup["model"])
    for row, path in zip(body["embeddings"], chosen, strict=True):
        assert cosine(row, expected_for(setup, path)) >= 0.9999


def test_embed_json_base64_equals_vembed_embed(setup):
    chosen = setup["images"][3:6]
    payload = {"images": [base64.b64encode(p.read_bytes()).decode() for p in chosen]}
    r = httpx.post(setup["server"].url + "/v1/embed", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    for row, path in zip(r.json()["embeddings"], chosen, strict=True):
        assert cosine(row, expected_for(setup, path)) >= 0.9999


def test_embed_paths_only_under_the_allowed_root(setup):
    url = setup["server"].url + "/v1/embed"
    inside = setup["images"][2]
    r = httpx.post(url, json={"paths": [str(inside.relative_to(setup["root"] / "data"))]}, timeout=60)
    assert r.status_code == 200, r.text
    assert cosine(r.json()["embeddings"][0], expected_for(setup, inside)) >= 0.9999
    r = httpx.post(url, json={"paths": ["../model/config.json"]}, timeout=60)
    assert r.status_code == 403 and "outside the allowed root" in r.json()["error"]
    r = httpx.post(url, json={"paths": ["http://example.com/a.jpg"]}, timeout=60)
    assert r.status_code == 400 and "URLs are not fetched" in r.json()["error"]


def vembed_search(setup, query: Path, k: int) -> list[dict]:
    out = cli("search", setup["store"], query, "--k", k, "--jsonl", "-q", F32).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("how", ["multipart", "json"])
def test_search_equals_vembed_search_jsonl(setup, how):
    query = setup["images"][7]
    want = vembed_search(setup, query, 5)
    url = setup["server"].url + "/v1/search"
    if how == "multipart":
        r = httpx.post(url, files={"image": (query.name, query.read_bytes())}, data={"k": "5"}, timeout=60)
    else:
        r = httpx.post(url, json={"image": base64.b64encode(query.read_bytes()).decode(), "k": 5}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [h["path"] for h in got] == [w["path"] for w in want]
    assert [h["rank"] for h in got] == [1, 2, 3, 4, 5]
    assert [h["label"] for h in got] == [w["label"] for w in want]
    for h, w in zip(got, want, strict=True):
        assert abs(h["score"] - w["score"]) <= 1e-5
    assert set(got[0]) == {"path", "label", "category", "score", "rank"}


def test_search_label_filter_is_the_filtered_exact_ranking(setup):
    query = setup["images"][0]  # class_0
    everything = vembed_search(setup, query, 12)
    want = [w["path"] for w in everything if w["label"] == "class_2"][:3]
    r = httpx.post(
        setup["server"].url + "/v1/search",
        files={"image": (query.name, query.read_bytes())},
        data={"k": "3", "label": "class_2"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [h["path"] for h in got] == want and {h["label"] for h in got} == {"class_2"}
    r = httpx.post(setup["server"].url + "/v1/search", json={"path": str(query), "k": 2, "category": "none"})
    assert r.status_code == 200 and r.json()["results"] == []


def test_info_and_docs(setup):
    info = httpx.get(setup["server"].url + "/v1/info", timeout=30).json()
    assert info["dim"] == 32 and info["store"]["size"] == 12 and info["store"]["index"] == "exact"
    assert info["preprocessing"]["image_size"] == 28 and info["text"] is False
    assert httpx.get(setup["server"].url + "/docs", timeout=30).status_code == 200
    paths = httpx.get(setup["server"].url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/embed", "/v1/search", "/v1/info", "/health"} <= set(paths)


def test_load_2000_requests_from_16_clients_every_answer_correct(setup):
    """2,000 single-image requests from 16 concurrent clients: no error, each answer its own image's."""
    images = setup["images"]
    payloads = [(p, p.read_bytes()) for p in images]
    url = setup["server"].url + "/v1/embed"
    wrong: list[str] = []
    statuses: dict[int, int] = {}

    async def client(worker: int, limits):
        async with httpx.AsyncClient(timeout=120, limits=limits) as session:
            for i in range(125):
                path, data = payloads[(worker * 7 + i) % len(payloads)]
                r = await session.post(url, files={"images": (path.name, data, "image/png")})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if (
                    r.status_code == 200
                    and cosine(r.json()["embeddings"][0], expected_for(setup, path)) < 0.9999
                ):
                    wrong.append(path.name)

    async def main():
        limits = httpx.Limits(max_connections=1)
        await asyncio.gather(*(client(w, limits) for w in range(16)))

    asyncio.run(main())
    assert statuses == {200: 2000} and not wrong
    stats = httpx.get(setup["server"].url + "/v1/info", timeout=30).json()["batching"]
    assert stats["largest_batch"] > 1  # concurrent requests did share forward passes


def truncated_png() -> bytes:
    data = png_bytes(class_image(0, 0, 64))
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """12,000 × 12,000 one-bit pixels (144 megapixels, over the 100 MP default) in a ~20 kB file."""
    return png_bytes(Image.new("1", (12_000, 12_000)))


def one_line_error(r) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json") and "\n" not in r.text
    return r.json()["error"]


@pytest.mark.parametrize(
    ("name", "request_kwargs", "status", "words"),
    [
        ("not an image", {"files": {"images": ("a.png", b"hello, not an image")}}, 400, "cannot decode"),
        ("truncated", {"files": {"images": ("t.png", truncated_png())}}, 400, "cannot decode"),
        ("empty file", {"files": {"images": ("e.png", b"")}}, 400, "empty"),
        ("decompression bomb", {"files": {"images": ("bomb.png", bomb_png())}}, 413, "over the limit"),
        ("too many images", {"json": {"images": ["aGk="] * 9}}, 413, "at most 8"),
        ("too many files", {"files": [("images", ("x.png", b"x"))] * 9}, 413, "at most 8"),
        ("body over the limit", {"content": b"x" * (2 * 2**20), "headers": {"content-type": "application/json"}}, 413, "MiB"),
        ("chunked body over the limit", {"content": iter([b"x" * 2**19] * 4)}, 413, "MiB"),
        ("bad base64", {"json": {"images": ["%%%"]}}, 400, "base64"),
        ("not JSON", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "not JSON"),
        ("no images", {"json": {"something": 1}}, 400, "needs 'images'"),
        ("texts, no text tower", {"json": {"texts": ["a red bicycle"]}}, 400, "no text tower"),
        ("a text field as a file", {"data": {"images": "hello"}, "files": {"other": ("o", b"o")}}, 400, "a text field"),
    ],
)  # fmt: skip
def test_bad_embed_requests_get_their_4xx(setup, name, request_kwargs, status, words):
    r = httpx.post(setup["server"].url + "/v1/embed", timeout=60, **request_kwargs)
    assert r.status_code == status, (name, r.text)
    assert words in one_line_error(r), (name, r.text)
    assert httpx.get(setup["server"].url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("request_kwargs", "status", "words"),
    [
        ({"data": {"k": "ten"}, "files": {"image": ("q.png", png_bytes(class_image(1, 0)))}}, 422, "not an integer"),
        ({"json": {"image": base64.b64encode(png_bytes(class_image(1, 0))).decode(), "k": 0}}, 422, "k=0"),
        ({"json": {"k": 3}}, 400, "needs 'image'"),
        ({"json": {"text": "a bicycle"}}, 400, "no text tower"),
        ({"files": [("image", ("a.png", b"a")), ("image", ("b.png", b"b"))]}, 400, "exactly one"),
        ({"files": {"image": ("bomb.png", bomb_png())}}, 413, "over the limit"),
    ],
)  # fmt: skip
def test_bad_search_requests_get_their_4xx(setup, request_kwargs, status, words):
    r = httpx.post(setup["server"].url + "/v1/search", timeout=60, **request_kwargs)
    assert r.status_code == status, r.text
    assert words in one_line_error(r)


def test_a_client_that_disconnects_mid_body_leaves_the_server_serving(setup):
    server = setup["server"]
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(
                b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="images"; '
                b'filename="a.png"\r\n\r\n\x89PNG'
            )
    path = setup["images"][1]
    r = httpx.post(server.url + "/v1/embed", files={"images": (path.name, path.read_bytes())}, timeout=60)
    assert r.status_code == 200 and cosine(r.json()["embeddings"][0], expected_for(setup, path)) >= 0.9999


def test_api_key_and_graceful_sigterm(setup, tmp_path):
    """With --api-key the /v1/ routes need the Bearer token; SIGTERM lets a request in flight finish."""
    server = Server(setup["model"], F32, "--api-key", "s3cret", "--max-wait-ms", 1500)
    try:
        path = setup["images"][4]
        files = {"images": (path.name, path.read_bytes())}
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        r = httpx.post(server.url + "/v1/embed", files=files, timeout=60)
        assert r.status_code == 401 and "API key" in one_line_error(r)
        bad = {"Authorization": "Bearer wrong"}
        assert httpx.get(server.url + "/v1/info", headers=bad, timeout=30).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        r = httpx.post(server.url + "/v1/search", json={"k": 1}, headers=auth, timeout=60)
        assert r.status_code == 404 and "no store" in one_line_error(r)
        r = httpx.post(server.url + "/v1/embed", json={"paths": [str(path)]}, headers=auth, timeout=60)
        assert r.status_code == 403 and "--allow-root" in one_line_error(r)

        answer = {}

        def slow_request():  # waits up to 1.5 s in the batcher for company
            answer["r"] = httpx.post(server.url + "/v1/embed", files=files, headers=auth, timeout=60)

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = httpx.get(server.url + "/v1/info", headers=auth, timeout=30).json()
            if info["batching"]["waiting"]:
                break
            time.sleep(0.02)
        assert info["batching"]["waiting"] == 1
        server.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert answer["r"].status_code == 200
        assert cosine(answer["r"].json()["embeddings"][0], expected_for(setup, path)) >= 0.9999
        # uvicorn exits by re-raising the signal it handled (a clean stop for systemd & co)
        assert server.proc.wait(60) in (0, -signal.SIGTERM), "".join(server.output)
        assert "Traceback" not in "".join(server.output)
    finally:
        server.stop()


def test_refuses_to_listen_on_the_network_without_an_api_key(setup):
    result = cli("serve", setup["model"], "--host", "0.0.0.0", code=2)
    assert "--api-key" in result.stderr


def test_a_dual_encoder_serves_texts_in_the_image_space(setup, tmp_path):
    """A CLIP-style model with a text tower: /v1/embed takes texts, /v1/search a text query."""
    from dual_helpers import save_tiny_dual

    from vembed.models.dual import load_dual_encoder, save_dual_encoder

    raw = save_tiny_dual(tmp_path / "raw", "clip")  # as from the hub: image features ≠ image-text space
    dual = save_dual_encoder(load_dual_encoder(raw, dtype="float32", device="cpu"), tmp_path / "clip")
    from vembed.serve.server import load_service
    from vembed.settings import load_settings

    settings = load_settings(None, [F32, "model.device=cpu"])
    assert not load_service(raw, settings=settings).has_text_tower  # its vision features: images only
    assert load_service(dual, settings=settings).has_text_tower
    images = setup["root"] / "data" / "images"
    cli("embed", images, "--model", dual, "--out", tmp_path / "store", "-q", F32)
    texts = ["a red chair", "a blue car"]
    want = load_dual_encoder(dual, dtype="float32", device="cpu").encode_text(texts)
    server = Server(dual, "--store", tmp_path / "store", F32)
    try:
        info = httpx.get(server.url + "/v1/info", timeout=30).json()
        assert info["text"] is True
        r = httpx.post(server.url + "/v1/embed", json={"texts": texts}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()["embeddings"]
        assert all(cosine(g, w) >= 0.9999 for g, w in zip(got, want, strict=True))
        r = httpx.post(server.url + "/v1/search", json={"text": texts[0], "k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        store = open_store(tmp_path / "store")
        order = (store.embeddings @ want[0]).argsort(descending=True)[:3].tolist()
        assert [h["path"] for h in r.json()["results"]] == [store.paths[i] for i in order]
        query = setup["images"][0]
        r = httpx.post(
            server.url + "/v1/search", files={"image": (query.name, query.read_bytes())}, data={"k": "1"}
        )
        assert r.json()["results"][0]["path"] == str(query.resolve())  # images still find themselves
    finally:
        server.stop()
