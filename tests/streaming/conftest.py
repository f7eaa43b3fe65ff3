"""Real servers on loopback for the shard tests: moto's S3 server and Python's HTTP server, each started as a
process and stopped by its pid. Without moto[server] (or s3fs, aiohttp) the tests skip with one line."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

NEEDED = ("moto", "s3fs", "aiohttp", "webdataset", "flask")


def missing_packages() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a loopback port: started, waited for (bounded), stopped by its pid."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict | None = None):
        self.argv, self.port, self.log, self.env = argv, port, log, env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Server":
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the process, closed here once it has it
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:3]} ended at start: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.argv[:3]} did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def s3_env(url: str, key: str = "phalanx-test", secret: str = "phalanx-secret") -> dict:
    """Where the AWS tools (and s3fs through botocore) find the endpoint and the credentials."""
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@pytest.fixture(scope="session")
def deps():
    gone = missing_packages()
    if gone:
        pytest.skip(f"shard streaming tests need {', '.join(gone)}: pip install -e '.[shards,dev]'")


def moto_server(tmp: Path, env_extra: dict | None = None) -> Server:
    port = free_port()
    env = dict(os.environ, **(env_extra or {}))
    return Server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                  tmp / f"moto-{port}.log", env).start()


@pytest.fixture(scope="session")
def s3(deps, tmp_path_factory):
    """A moto S3 server on loopback; yields (server, AWS environment for it)."""
    server = moto_server(tmp_path_factory.mktemp("moto"))
    try:
        yield server, s3_env(server.url)
    finally:
        server.stop()


def http_server(folder: Path, tmp: Path, port: int | None = None) -> Server:
    port = port or free_port()
    return Server([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
                  port, tmp / f"http-{port}.log").start()


def upload(env: dict, folder: Path, bucket: str, prefix: str) -> str:
    """Put the files of `folder` under s3://bucket/prefix/ (through s3fs, as the tests' AWS environment says)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for f in sorted(folder.iterdir()):
            fs.put_file(str(f), f"{bucket}/{prefix}/{f.name}")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return f"s3://{bucket}/{prefix}"
