"""What the explorer refuses before a route runs, and what its errors never say: hosts it
does not serve, bodies that are not JSON or too large, values of the wrong type, text that
is not Unicode, and the request's own values in error responses."""

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from mlsae.explorer import create_app
from mlsae.explorer.__main__ import build_app, parse_args
from mlsae.explorer.guards import DEFAULT_MAX_BODY_BYTES
from mlsae.explorer.service import ExplorerInputError, ExplorerService
from mlsae.model.lightning import MLSAETransformer
from tests.explorer.conftest import PROMPT, PROMPT_ROUTES, local_client

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def client(model: MLSAETransformer) -> TestClient:
    return local_client(create_app(model), raise_server_exceptions=False)


def assert_short_json_error(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]
    assert len(response.content) < 400


# Error responses -----------------------------------------------------------------------------


def test_validation_errors_name_the_field_but_not_the_input(client: TestClient) -> None:
    marker = "SECRET-" * 20_000  # over the schemas' 100,000 characters
    response = client.post("/api/tokenize", json={"prompt": marker})
    assert_short_json_error(response, 422)
    [error] = response.json()["detail"]
    assert set(error) == {"type", "loc", "msg"}
    assert error["loc"] == ["body", "prompt"] and "100000" in error["msg"]

    response = client.post("/api/logits", json={"prompt": "SECRET", "top_n": 10**6})
    assert response.status_code == 422 and "SECRET" not in response.text
    assert "1000000" not in response.text  # neither `input` nor `ctx` comes back


def test_a_long_unknown_field_name_is_cut_short(client: TestClient) -> None:
    name = "x" * 10_000
    response = client.post("/api/tokenize", json={"prompt": "hi", name: 1})
    assert_short_json_error(response, 422)
    location = response.json()["detail"][0]["loc"]
    assert location[0] == "body" and location[1].startswith("xxx") and len(location[1]) <= 64


@pytest.mark.parametrize(
    "path", ["/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fcli.py"]
)
def test_static_files_stay_in_their_folder(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404 and "import" not in response.text


# Body size -----------------------------------------------------------------------------------


def test_a_body_over_the_default_cap_is_413(client: TestClient) -> None:
    body = b'{"prompt": "' + b"x" * DEFAULT_MAX_BODY_BYTES + b'"}'
    assert_short_json_error(client.post("/api/tokenize", content=body, headers=JSON), 413)


def test_the_largest_legitimate_request_fits_the_default_cap(client: TestClient) -> None:
    # Every character escaped as a surrogate pair, the most bytes JSON spends on one.
    prompt = "\U0001f600" * 100_000
    positions = [9_999_999] * 100_000
    body = json.dumps({"prompt": prompt, "latent": 0, "layer": 0, "positions": positions})
    assert 2_000_000 < len(body) <= DEFAULT_MAX_BODY_BYTES
    response = client.post("/api/logits/steering", content=body.encode(), headers=JSON)
    assert response.status_code == 422  # too many tokens for the model, but read
    assert "400000 tokens, more than the 128" in response.json()["detail"]


class Upload:
    """An ASGI `receive` that streams a body in 1 KiB chunks and counts what it gave."""

    def __init__(self, n_chunks: int) -> None:
        self.n_chunks = n_chunks
        self.given = 0

    async def __call__(self) -> dict:
        if self.given == self.n_chunks:
            return {"type": "http.disconnect"}
        self.given += 1
        more = self.given < self.n_chunks
        return {"type": "http.request", "body": b"x" * 1024, "more_body": more}


def call_asgi(app, upload: Upload, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/tokenize",
        "raw_path": b"/api/tokenize",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, upload, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], json.loads(body)


def test_a_streamed_body_is_read_no_further_than_the_cap(model: MLSAETransformer) -> None:
    app = create_app(model, max_body_bytes=10 * 1024)
    upload = Upload(n_chunks=1000)  # 1 MiB, chunked: no Content-Length
    status, body = call_asgi(app, upload, [])
    assert status == 413 and "10240 bytes" in body["detail"]
    assert upload.given == 11  # the chunk that crossed the cap, and none after it


def test_a_declared_length_over_the_cap_is_refused_unread(model: MLSAETransformer) -> None:
    app = create_app(model, max_body_bytes=10 * 1024)
    upload = Upload(n_chunks=1000)
    status, _ = call_asgi(app, upload, [(b"content-length", b"%d" % (1000 * 1024))])
    assert status == 413 and upload.given == 0


# Media type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/tokenize", "/api/py/prompt/tokens", "/api/py/examples"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_post_that_is_not_json_is_415(
    client: TestClient, path: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = client.post(path, content=b'{"prompt": "hi"}', headers=headers)
    assert_short_json_error(response, 415)


def test_json_with_a_charset_is_json(client: TestClient) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    response = client.post("/api/tokenize", content=b'{"prompt": "hi"}', headers=headers)
    assert response.status_code == 200


# Strict types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/latent", {"prompt": PROMPT, "latent": True}),
        ("/api/latent", {"prompt": PROMPT, "latent": "3"}),
        ("/api/latent", {"prompt": PROMPT, "latent": 3.0}),
        ("/api/logits", {"prompt": PROMPT, "top_n": "5"}),
        ("/api/logits/steering", {"prompt": PROMPT, "latent": 0, "layer": 0, "factor": "2"}),
        ("/api/logits/steering", {"prompt": PROMPT, "latent": 0, "layer": 0, "positions": ["1"]}),
        ("/api/examples", {"latent": False}),
        ("/api/py/examples", {"latent": "1", "layer": 0}),
        ("/api/py/prompt/logits-steer", {"prompt": "hi", "latent": 0, "layer": 0, "factor": True}),
    ],
)
def test_values_of_the_wrong_type_are_not_coerced(
    client: TestClient, path: str, body: dict
) -> None:
    response = client.post(path, json=body)
    assert_short_json_error(response, 422)


def test_an_integer_is_a_float(client: TestClient) -> None:
    body = {"prompt": PROMPT, "latent": 0, "layer": 0, "factor": 2}
    assert client.post("/api/logits/steering", json=body).status_code == 200
    assert client.post("/api/py/prompt/logits-steer", json=body).status_code == 200


# Text that is not Unicode --------------------------------------------------------------------


@pytest.mark.parametrize(("path", "extra"), PROMPT_ROUTES)
def test_a_lone_surrogate_is_a_422_with_a_reason(
    client: TestClient, path: str, extra: dict
) -> None:
    body = json.dumps({"prompt": "a\\udcffb", **extra}).replace("\\\\", "\\")
    assert '"a\\udcffb"' in body
    response = client.post(path, content=body.encode(), headers=JSON)
    assert_short_json_error(response, 422)
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and "string" in error["msg"]


def test_the_service_refuses_a_lone_surrogate(model: MLSAETransformer) -> None:
    with pytest.raises(ExplorerInputError, match="character 1 is a lone surrogate"):
        ExplorerService(model).token_ids("a\udcffb")


# Hosts ---------------------------------------------------------------------------------------


def cli_client(model: MLSAETransformer, args: list[str], host: str) -> TestClient:
    app = build_app(parse_args(["--repo_id", "some/model", *args]), model, None)
    return TestClient(app, base_url=f"http://{host}")


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "127.0.0.1", "localhost:8000", "LocalHost", "[::1]:8000"]
)
def test_the_command_line_serves_its_own_address(model: MLSAETransformer, host: str) -> None:
    assert cli_client(model, [], host).get("/api/params").status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example", "0.0.0.0"]
)
def test_the_command_line_refuses_other_hosts(model: MLSAETransformer, host: str) -> None:
    client = cli_client(model, [], host)
    assert_short_json_error(client.get("/api/params"), 400)
    assert_short_json_error(client.post("/api/tokenize", json={"prompt": "hi"}), 400)
    assert client.get("/").status_code == 400


def test_allowed_hosts_widens_the_hosts_served(model: MLSAETransformer) -> None:
    args = ["--host", "0.0.0.0", "--allowed_hosts", "lab.example.org", "10.0.0.5"]
    args += ["--allowed_hosts", "*.corp.example"]
    for host in ("lab.example.org:8000", "10.0.0.5:8000", "a.corp.example", "localhost"):
        assert cli_client(model, args, host).get("/api/params").status_code == 200, host
    for host in ("0.0.0.0:8000", "corp.example", "evil.example"):
        assert cli_client(model, args, host).get("/api/params").status_code == 400, host
    bound = ["--host", "192.168.1.7"]
    assert cli_client(model, bound, "192.168.1.7:8000").get("/api/params").status_code == 200


def test_the_programmatic_default_serves_loopback_only(model: MLSAETransformer) -> None:
    assert TestClient(create_app(model)).get("/api/params").status_code == 400  # "testserver"
    anyone = TestClient(create_app(model, allowed_hosts=["*"]))
    assert anyone.get("/api/params").status_code == 200


def test_the_help_explains_allowed_hosts(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allowed_hosts" in text and "0.0.0.0" in text and "DNS rebinding" in text
