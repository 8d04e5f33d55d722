"""`pagent worker` across network namespaces: each worker on its own "host" (a network namespace
with its own hostname, `unshare --uts`), reaching a private password-protected redis-server only
over a veth pair and a bridge, with the input folder hidden under a tmpfs (it reads nothing but
Redis). Needs root and `ip netns`; skipped with the reason elsewhere, a failure with CI=true.
Everything the test creates (namespaces, veths, bridge, processes) is removed by it.
"""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
RECORDS = 600
PIPELINE = """
name: netns
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 10}]}
  - name: work
    dependencies: [split]
    modules: [{use: map, function: "steps_for_workers:ledger_triple"}]
    node_config: {concurrency: 2, lease: 1.0, max_retries: 5, retry_delay: 0.05}
  - {name: collect, dependencies: [work], modules: [{use: aggregate}]}
"""

pytestmark = [pytest.mark.fault, pytest.mark.slow]


def _sh(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), capture_output=True, timeout=30)


def _why_not_permitted() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, tmpfs)"
    for tool in ("ip", "unshare", "redis-server", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"pgprobe{secrets.token_hex(2)}"
    made = _sh("ip", "netns", "add", probe)
    if made.returncode != 0:
        return f"ip netns add is not permitted: {made.stderr.decode().strip()}"
    _sh("ip", "netns", "delete", probe)
    return None


@dataclass
class Network:
    """A bridge in this namespace with the Redis address, and one namespace per worker host."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: str = field(
        default_factory=lambda: f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    )
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"pgbr{self.tag}"

    @property
    def redis_ip(self) -> str:
        return f"{self.subnet}.1"

    def _run(self, *args: str) -> None:
        done = _sh(*args)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.decode()}"

    def create(self) -> None:
        self._run("ip", "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        self._run("ip", "addr", "add", f"{self.redis_ip}/24", "dev", self.bridge)
        self._run("ip", "link", "set", self.bridge, "up")

    def add_host(self, number: int) -> str:
        """A namespace whose only way out is a veth into the bridge; returns its name."""
        name = f"pgw{self.tag}{number}"
        outside, inside = f"pgv{self.tag}{number}", f"pgi{self.tag}{number}"
        self._run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self._run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self.links.append(outside)
        self._run("ip", "link", "set", inside, "netns", name)
        self._run("ip", "link", "set", outside, "master", self.bridge)
        self._run("ip", "link", "set", outside, "up")
        self._run("ip", "-n", name, "addr", "add", f"{self.subnet}.{10 + number}/24", "dev", inside)
        self._run("ip", "-n", name, "link", "set", inside, "up")
        self._run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def set_link(self, number: int, state: str) -> None:
        """Cut (down) or heal (up) one worker host's cable."""
        self._run("ip", "link", "set", f"pgv{self.tag}{number}", state)

    def remove(self) -> None:
        for name in self.namespaces:
            _sh("ip", "netns", "delete", name)
        for link in self.links:
            _sh("ip", "link", "delete", link)


@dataclass
class Cluster:
    tmp: Path
    network: Network
    store: str
    pipeline: Path
    data: Path
    ledger: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker_on(self, number: int, *extra: str) -> subprocess.Popen[bytes]:
        """`pagent worker` on host `number`: its namespace, its hostname, the input hidden."""
        namespace = self.network.add_host(number)
        script = (
            f"mount -t tmpfs -o size=1m pagent-hidden {self.data.parent} && "
            f"hostname host{number} && "
            f"exec {sys.executable} -m parallel_agent worker --pipeline {self.pipeline} "
            + " ".join(extra)
        )
        proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "unshare", "--uts", "--mount",
             "--propagation", "private", "sh", "-c", script],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def coordinator(self, task_id: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parallel_agent", "run", str(self.pipeline), "--data",
             str(self.data), "--task-id", task_id, "--output", str(self.tmp / f"{task_id}.jsonl"),
             "-q", *extra],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def ledger_rows(self) -> list[tuple[str, int]]:
        if not self.ledger.exists():
            return []
        rows = []
        for line in self.ledger.read_text().splitlines():
            host, _pid, item, _at = line.split()
            rows.append((host, int(item)))
        return rows

    def check_output(self, task_id: str) -> None:
        output = (self.tmp / f"{task_id}.jsonl").read_bytes()
        counts = collections.Counter(int(line) // 3 for line in output.splitlines())
        assert sorted(counts) == list(range(RECORDS)), "every record once"
        assert max(counts.values()) == 1, "nothing twice"
        assert output == b"".join(f"{i * 3}\n".encode() for i in range(RECORDS))


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr.decode()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = _why_not_permitted()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"network namespaces: {reason}; CI=true requires them")
        pytest.skip(f"network namespaces: {reason}")
    network = Network()
    redis_proc = None
    cluster = None
    try:
        network.create()
        password = secrets.token_hex(8)
        port = 20000 + secrets.randbelow(20000)
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", network.redis_ip, "--save", "",
             "--appendonly", "no", "--requirepass", password, "--dir", str(redis_dir),
             "--logfile", str(redis_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        import redis

        client = redis.Redis(host=network.redis_ip, port=port, password=password)
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        data = data_dir / "in.jsonl"
        data.write_text("".join(f"{i}\n" for i in range(RECORDS)))
        pipeline = tmp_path / "netns.yaml"
        pipeline.write_text(PIPELINE)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "PAGENT_LEDGER": str(tmp_path / "ledger.txt"),
            "PAGENT_LEDGER_SLEEP": "0.02",
            "PAGENT_STORE": f"redis://:{password}@{network.redis_ip}:{port}/0?retry_budget=20",
        }
        cluster = Cluster(
            tmp_path, network, env["PAGENT_STORE"], pipeline, data, tmp_path / "ledger.txt", env
        )
        yield cluster
    finally:
        for proc in cluster.procs if cluster else []:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(timeout=10)
        network.remove()


def test_three_worker_hosts_all_commit_reading_nothing_but_redis(cluster: Cluster) -> None:
    workers = [cluster.worker_on(n, "--task-id", "ns3") for n in (1, 2, 3)]
    coordinator = cluster.coordinator("ns3")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    for worker in workers:
        code, stderr = finish(worker)
        assert code == 0, stderr
    hosts = {host for host, _ in cluster.ledger_rows()}
    assert {"host1", "host2", "host3"} <= hosts, hosts
    cluster.check_output("ns3")


def test_partitioned_worker_late_commit_is_rejected(cluster: Cluster) -> None:
    """One worker host's cable is cut past its lease (1 s), then healed: the chunk it held was
    done by others, its late work is refused, it goes on working."""
    cluster.env["PAGENT_LEDGER_SLEEP"] = "0.05"  # the run outlasts the cut
    cut = cluster.worker_on(1, "--task-id", "part")
    other = cluster.worker_on(2, "--task-id", "part")
    coordinator = cluster.coordinator("part")
    deadline = time.monotonic() + 60
    while not any(host == "host1" for host, _ in cluster.ledger_rows()):
        assert time.monotonic() < deadline, "host1 never worked"
        time.sleep(0.02)
    cluster.network.set_link(1, "down")
    time.sleep(3.0)  # three leases: the others take its chunk over meanwhile
    cluster.network.set_link(1, "up")
    code, stderr = finish(coordinator)
    assert code == 0, stderr
    for worker in (cut, other):
        code, stderr = finish(worker)
        assert code == 0, stderr
    executions = collections.Counter(item for _, item in cluster.ledger_rows())
    assert any(n > 1 for n in executions.values()), "the cut host's chunk was done again"
    cluster.check_output("part")
