"""Real Redis topologies on local ports for the tests: a Redis Cluster (three primaries,
three replicas) and a Sentinel-managed primary with a replica. No docker: plain
``redis-server`` processes, owned by the test session and torn down with it.

Both offer what the failover tests need: which node serves what, a graceful
failover, and a killed primary (``kill -9``) that a replica replaces."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from inferstack.procs import spawn_owned
from inferstack.redis_server import free_port


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: `make test` installs it (apt-get install redis-server)")
    return binary


def _wait(what: str, check, timeout: float = 30.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


class _Node:
    """One ``redis-server`` process; restartable with the same port and files."""

    def __init__(self, root: Path, port: int, extra: list[str], *, args: list[str] | None = None):
        self.port = port
        self.dir = root / str(port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args or [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(self.dir), "--loglevel", "warning", "--logfile",
                             str(self.dir / "log"), "--repl-diskless-sync-delay", "0", *extra]
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = spawn_owned(self.args, stdout=subprocess.DEVNULL)
        _wait(f"redis-server on {self.port}", lambda: self.client().ping())

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=2, **kw)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: no goodbye to the cluster, no final write."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class LocalCluster:
    """Six ``redis-server --cluster-enabled yes`` joined by ``redis-cli --cluster create
    --cluster-replicas 1``: three primaries, each with a replica. ``node_timeout_ms``
    is how long a silent primary is given before its replica takes over."""

    def __init__(self, primaries: int = 3, node_timeout_ms: int = 1000):
        self.root = Path(tempfile.mkdtemp(prefix="inferstack-cluster-"))
        self.nodes: dict[int, _Node] = {}
        try:
            for _ in range(primaries * 2):
                port = free_port()
                self.nodes[port] = _Node(self.root, port, [
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(free_port()),
                    # a replica that lost its primary takes over at once, however stale
                    "--cluster-replica-validity-factor", "0",
                ])
            subprocess.run(
                ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.nodes],
                 "--cluster-replicas", "1", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """Every node, as ``INFERSTACK_REDIS_URL`` takes a cluster's startup nodes."""
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.nodes)

    # -- who serves what ----------------------------------------------------------

    def _any(self) -> _Node:
        return next(n for n in self.nodes.values() if n.alive)

    def shards(self) -> list[dict]:
        """[{"slots": [(lo, hi)], "primary": port, "replicas": [port]}] from ``CLUSTER
        NODES`` (as one live node sees it), only nodes that are up."""
        nodes = self._any().client().execute_command("CLUSTER NODES")  # parsed by redis-py
        by_id, out = {}, []
        for addr, n in nodes.items():
            port = int(addr.split("@")[0].rsplit(":", 1)[1])
            by_id[n["node_id"]] = port
        for addr, n in nodes.items():
            flags = n["flags"].split(",")
            if "master" in flags and "fail" not in flags and n["slots"]:
                out.append({"id": n["node_id"], "primary": by_id[n["node_id"]],
                            "slots": [(int(r[0]), int(r[-1])) for r in n["slots"]], "replicas": []})
        for addr, n in nodes.items():
            flags = n["flags"].split(",")
            if "slave" in flags and "fail" not in flags and n["connected"]:
                for shard in out:
                    if shard["id"] == n["master_id"]:
                        shard["replicas"].append(by_id[n["node_id"]])
        return out

    def primaries(self) -> list[int]:
        return sorted(s["primary"] for s in self.shards())

    def keyslot(self, key: str) -> int:
        return int(self._any().client().execute_command("CLUSTER KEYSLOT", key))

    def primary_of(self, key: str) -> int:
        slot = self.keyslot(key)
        for s in self.shards():
            if any(lo <= slot <= hi for lo, hi in s["slots"]):
                return s["primary"]
        raise RuntimeError(f"no primary serves slot {slot}")

    def replica_of(self, primary: int) -> int:
        for s in self.shards():
            if s["primary"] == primary and s["replicas"]:
                return s["replicas"][0]
        raise RuntimeError(f"primary {primary} has no replica online")

    # -- state --------------------------------------------------------------------

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says the cluster is ok, every slot has an online primary, and
        every primary has a replica online (so a next failover has somewhere to go)."""
        def healthy():
            for node in self.nodes.values():
                if node.alive and node.client().execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                    return False
            shards = self.shards()
            covered = sum(hi - lo + 1 for s in shards for lo, hi in s["slots"])
            return covered == 16384 and all(s["replicas"] for s in shards)
        _wait("a healthy cluster", healthy, timeout)

    def flush(self) -> None:
        for port in self.primaries():
            self.nodes[port].client().flushall()
        for port in self.primaries():  # replicas follow, so a failover never brings old keys back
            self.nodes[port].client().execute_command("WAIT", 1, 2000)

    # -- failures -----------------------------------------------------------------

    def failover(self, primary: int) -> int:
        """``CLUSTER FAILOVER`` on the primary's replica (graceful: no write is lost);
        returns the new primary once it serves."""
        replica = self.replica_of(primary)
        self.nodes[replica].client().execute_command("CLUSTER FAILOVER")
        _wait("the replica to take over", lambda: replica in self.primaries() and primary not in self.primaries())
        return replica

    def kill_primary(self, primary: int) -> int:
        """``kill -9`` a primary; returns its replica once the cluster promoted it."""
        replica = self.replica_of(primary)
        self.nodes[primary].kill()
        _wait("the replica to be promoted", lambda: replica in self.primaries())
        return replica

    def restart(self, port: int) -> None:
        """Bring a killed node back: it rejoins as a replica of whoever took its slots."""
        self.nodes[port].start()
        self.wait_healthy()

    def heal(self) -> None:
        """Restart whatever was killed and wait for full health (between tests)."""
        for port, node in self.nodes.items():
            if not node.alive:
                node.start()
        self.wait_healthy()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class LocalSentinel:
    """A primary, a replica and ``sentinels`` sentinels watching it under ``master``."""

    def __init__(self, master: str = "inferstack", sentinels: int = 1, down_after_ms: int = 1000):
        self.master = master
        self.root = Path(tempfile.mkdtemp(prefix="inferstack-sentinel-"))
        self.nodes: dict[int, _Node] = {}
        self.sentinels: list[_Node] = []
        try:
            primary = free_port()
            self.nodes[primary] = _Node(self.root, primary, [])
            replica = free_port()
            self.nodes[replica] = _Node(self.root, replica, ["--replicaof", "127.0.0.1", str(primary)])
            quorum = sentinels // 2 + 1
            for _ in range(sentinels):
                port = free_port()
                conf = self.root / f"sentinel-{port}.conf"
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
                    f"sentinel monitor {master} 127.0.0.1 {primary} {quorum}\n"
                    f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
                    f"sentinel failover-timeout {master} 5000\n"
                    f"sentinel parallel-syncs {master} 1\n"
                )
                self.sentinels.append(_Node(self.root, port, [], args=[
                    _binary(), str(conf), "--sentinel", "--logfile", str(self.root / f"sentinel-{port}.log")]))
            _wait("the replica to sync", lambda: self.nodes[replica].client().info("replication")
                  .get("master_link_status") == "up")
            _wait("the sentinels to see the replica", lambda: all(
                s.client().execute_command("SENTINEL", "REPLICAS", master) for s in self.sentinels))
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The sentinels, as ``INFERSTACK_REDIS_URL`` takes them in sentinel mode."""
        return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def primary(self) -> int:
        host, port = self.sentinels[0].client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
        return int(port)

    def flush(self) -> None:
        client = self.nodes[self.primary()].client()
        client.flushall()
        client.execute_command("WAIT", 1, 2000)

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; returns the new primary's port once the old one follows it."""
        old = self.primary()
        self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", self.master)
        new = _wait("sentinel to promote the replica", lambda: (p := self.primary()) != old and p)
        _wait("the new primary to take writes",
              lambda: self.nodes[new].client().info("replication")["role"] == "master")
        return new

    def kill_primary(self) -> int:
        old = self.primary()
        self.nodes[old].kill()
        return _wait("sentinel to promote the replica", lambda: (p := self.primary()) != old and p, timeout=30)

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes.values()]:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
