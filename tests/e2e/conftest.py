"""A real 2-node swarm on loopback with its HTTP API, shared by the end-to-end tests.

Node A serves layers 0..15 and the API (with an API key); node B serves 15..30.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = pathlib.Path(os.environ.get("ALLMENDE_BIN", ROOT / "target" / "release" / "allmende"))
API_KEY = "test-key-123"
OUTPUT = ROOT / "target" / "test-output"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, workdir, name, layers, extra=()):
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "w")
        cmd = [str(BINARY), "serve", "--layers", layers, "--listen", "/ip4/127.0.0.1/tcp/0",
               "--identity", str(workdir / f"{name}.key"), "--no-mdns", "--threads", "1", *extra]
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            text = self.log_path.read_text()
            if "serving layers" in text and ("--api" not in extra or "API and web page" in text):
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"node {name} exited:\n{text}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"node {name} did not start:\n{self.log_path.read_text()}")
        self.peer_id = re.search(r"peer id: (\S+)", text).group(1)
        self.addr = re.search(r"listening on (\S+)", text).group(1)

    def stop(self):
        self.process.kill()
        self.process.wait()
        self.log.close()


class Swarm:
    def __init__(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="allmende-e2e-"))
        self.port = free_port()
        self.a = Node(self.dir, "a", "0..15",
                      ("--api", f"127.0.0.1:{self.port}", "--api-key", API_KEY))
        self.b = Node(self.dir, "b", "15..30", ("--bootstrap", self.a.addr))
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_until_covered()

    def wait_until_covered(self):
        import urllib.request
        deadline = time.time() + 30
        while time.time() < deadline:
            with urllib.request.urlopen(self.url + "/api/swarm") as response:
                swarm = json.load(response)
            if not swarm["missing"] and len(swarm["peers"]) == 2:
                return
            time.sleep(0.3)
        raise RuntimeError(f"the swarm never covered the model: {swarm}")

    def cli(self, *args):
        """Runs the allmende binary; returns the JSON object on its last line."""
        out = subprocess.run([str(BINARY), *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self):
        self.b.stop()
        self.a.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def swarm():
    assert BINARY.exists(), f"{BINARY} is missing: build it with cargo build --release"
    swarm = Swarm()
    yield swarm
    swarm.stop()


@pytest.fixture(scope="session")
def output_dir():
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT
