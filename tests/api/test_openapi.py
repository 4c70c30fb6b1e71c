"""The OpenAPI description against the real server.

- `openapi-spec-validator` checks the served document is valid OpenAPI 3.1.
- `schemathesis` generates requests from it (examples, boundary values,
  random and negative data, and the stateful links: publish, then poll what
  was published) and checks every answer: no 5xx, a status, content type,
  headers and body the description allows. Bounded: a fixed number of
  examples per operation and a fixed seed.

The server runs with short stream lifetimes so that SSE, iframe and long poll
answers end and can be checked whole.

    HERALD_BIN=target/debug/herald PYTHONPATH=tests/api/.pydeps python3 -m pytest tests/api
"""

import json
import os
import subprocess
import sys
import tempfile
import urllib.request

import pytest

HERALD_BIN = os.environ.get("HERALD_BIN", "target/debug/herald")
KEY = "schemathesis-key"
# Per operation; with --seed, a run is repeatable.
EXAMPLES = os.environ.get("SCHEMATHESIS_EXAMPLES", "25")
CONFIG = os.path.join(os.path.dirname(__file__), "schemathesis.toml")


class Herald:
    def __init__(self, env):
        self.dir = tempfile.TemporaryDirectory()
        full = dict(os.environ)
        full.update({"HERALD_LOG": "warn", **env})
        self.proc = subprocess.Popen(
            [HERALD_BIN, "serve", "--http", "127.0.0.1:0", "--mqtt", "off", "--data", self.dir.name + "/data"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        assert line.startswith("herald listening on "), line
        self.url = line.removeprefix("herald listening on ")
        self.proc.stdout.readline()  # the MQTT line

    def stop(self):
        self.proc.kill()
        _, err = self.proc.communicate()
        self.dir.cleanup()
        return err


# Streams end quickly, long polls wait briefly: every answer can be read whole.
SHORT = {"HERALD_SSE_MAX_LIFETIME": "300ms", "HERALD_LONGPOLL_MAX_WAIT": "1s"}


@pytest.fixture
def open_server():
    s = Herald(SHORT)
    yield s
    err = s.stop()
    assert "panicked" not in err, err


@pytest.fixture
def auth_server():
    s = Herald({**SHORT, "HERALD_AUTH_API_KEYS": KEY, "HERALD_AUTH_JWT_SECRET": "schemathesis-secret-0123456789"})
    yield s
    err = s.stop()
    assert "panicked" not in err, err


def fetch_document(url):
    with urllib.request.urlopen(url + "/api/openapi.json") as res:
        assert res.headers["content-type"] == "application/json"
        return json.load(res)


def test_the_served_description_is_valid_openapi_3_1(open_server):
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    doc = fetch_document(open_server.url)
    assert doc["openapi"] == "3.1.0"
    validate(doc, cls=OpenAPIV31SpecValidator)


def schemathesis(server, *extra):
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", CONFIG, "run", server.url + "/api/openapi.json",
        "--checks", "all",
        # See schemathesis.toml: the channel routes' last segment.
        "--exclude-checks", "unsupported_method,allow_header_conformance",
        "--max-examples", EXAMPLES,
        "--seed", "15",
        "--request-timeout", "10",
        "--workers", "1",
        "--generation-database", "none",
        "--no-color",
        *extra,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    print(output)
    return run.returncode, output


def test_schemathesis_finds_nothing_in_open_mode(open_server):
    code, output = schemathesis(open_server)
    assert code == 0, output
    assert "No issues found" in output or "passed" in output, output


def test_schemathesis_finds_nothing_with_an_api_key(auth_server):
    code, output = schemathesis(auth_server, "-H", f"Authorization: Bearer {KEY}")
    assert code == 0, output
