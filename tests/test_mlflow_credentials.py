"""The operator's own MLflow calls carry the run's credentials, for that run's server only.

What goes on the wire is checked: a loopback HTTP listener records the Authorization header of
each request MLflow's client sends (and answers 401, as an auth-enabled server does without
valid credentials). The operator's own login never reaches a server a tenant chose, even though
MLflow's client would read it from the process environment.
"""

from __future__ import annotations

import base64
import http.server
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from visionr1_operator import mlflow_runs
from visionr1_operator.handlers import OperatorConfig, Reconciler
from visionr1_operator.kube import ApiError

OWN = "http://mlflow.visionr1-system.svc:5000"


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str | None]

    def _answer(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        body = b'{"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 (http.server's names)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_servers_credentials_go_with_its_requests_and_the_environments_never(
    listener: tuple[str, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, seen = listener
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "operator-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "operator-secret")
    with pytest.raises(Exception, match="401|not authenticated|UNAUTHENTICATED"):
        mlflow_runs.end(mlflow_runs.Server(uri, username="team-a", password="pw-a"), "r1", "FAILED")
    assert seen and set(seen) == {_basic("team-a", "pw-a")}
    seen.clear()
    with pytest.raises(Exception, match="401|not authenticated|UNAUTHENTICATED"):
        mlflow_runs.end(mlflow_runs.Server(uri), "r1", "FAILED")  # none given: none sent
    assert seen and set(seen) == {None}
    seen.clear()
    with pytest.raises(Exception, match="401|not authenticated|UNAUTHENTICATED"):
        mlflow_runs.end(mlflow_runs.Server(uri, token="tok"), "r1", "FAILED")
    assert set(seen) == {"Bearer tok"}
    assert "pw-a" not in repr(mlflow_runs.Server(uri, username="team-a", password="pw-a"))


class SecretKube:
    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        self.secrets = secrets
        self.gets: list[tuple[str, str]] = []

    async def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        assert (api_version, plural) == ("v1", "secrets")
        self.gets.append((namespace, name))
        if (namespace, name) not in self.secrets:
            raise ApiError(404, "GET", f"secrets {namespace}/{name}", "not found", "NotFound")
        data = self.secrets[(namespace, name)]
        return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


async def test_whose_credentials_the_operator_uses_for_a_run() -> None:
    rec = Reconciler(
        OperatorConfig(
            mlflow_uri=OWN, mlflow_credentials={"username": "operator", "password": "op-pw"}
        )
    )
    kube = SecretKube(
        {
            ("team-a", "mlflow-login"): {
                "MLFLOW_TRACKING_USERNAME": "team-a",
                "MLFLOW_TRACKING_PASSWORD": "a-pw",
                "UNRELATED": "x",
            }
        }
    )
    rec.kube = kube  # type: ignore[assignment]
    # the run's own Secret, for whichever server the run tracks to
    server, error = await rec._server("team-a", None, "mlflow-login")
    assert error is None
    assert (server.uri, server.username, server.password) == (OWN, "team-a", "a-pw")
    server, _ = await rec._server("team-a", "https://other.example", "mlflow-login")
    assert (server.uri, server.username) == ("https://other.example", "team-a")
    assert kube.gets == [("team-a", "mlflow-login")]  # read once, then cached
    # no Secret: the operator's login for its own server, nothing for any other
    server, _ = await rec._server("team-a", None, None)
    assert (server.username, server.password) == ("operator", "op-pw")
    server, _ = await rec._server("team-a", "https://other.example", None)
    assert (server.username, server.password, server.token) == (None, None, None)
    # a Secret that is not there: no tracking, and the field and the fix named
    server, error = await rec._server("team-b", None, "missing")
    assert server is None
    assert error.startswith("spec.mlflow.credentialsSecret: cannot read Secret team-b/missing")
    assert "MLFLOW_TRACKING_USERNAME" in error
    # no server at all: nothing to do
    assert await Reconciler(OperatorConfig())._server("team-a", None, None) == (None, None)


def test_the_operator_takes_its_own_login_out_of_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`visionr1 operator` reads its login once, for its own server, and removes it from the
    environment, where any MLflow client of the process would send it anywhere."""
    import kopf

    import visionr1_operator.handlers as handlers
    from visionr1_operator.cli import build_parser
    from visionr1_operator.main import main

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "operator")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "op-pw")
    started: dict[str, Any] = {}

    async def fake_operator(**kwargs: Any) -> None:  # kopf itself is not under test here
        started.update(kwargs)

    monkeypatch.setattr(kopf, "operator", fake_operator)
    captured: dict[str, Any] = {}
    real = handlers.make_registry

    def spy(config: OperatorConfig) -> Any:
        captured["config"] = config
        return real(config)

    monkeypatch.setattr(handlers, "make_registry", spy)
    args = build_parser().parse_args(["operator", "-n", "team-a", "--mlflow-uri", OWN])
    assert main(args) == 0
    config = captured["config"]
    assert config.mlflow_credentials == {"username": "operator", "password": "op-pw"}
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    assert started["namespaces"] == ["team-a"]
