"""Real Apache Kafka brokers (KRaft, broker + controller in one JVM) for tests.

The broker's jars come from Maven Central: ``tests/kafka/pom.xml`` names
``org.apache.kafka:kafka_2.13`` and a logging backend, and
``mvn dependency:copy-dependencies`` copies them with their runtime
dependencies into ``~/.cache/mmpipe/kafka/<version>/libs`` once; later runs
(and other clones on the machine) reuse them.  Each :class:`KafkaBroker`
formats its own storage in a temporary directory and listens on free
loopback ports: PLAINTEXT for the tests, SASL_PLAINTEXT (PLAIN and
SCRAM-SHA-256) for the security pass-through test, CONTROLLER for KRaft.
``stop()`` / ``start()`` keep ports and storage, so a test can take the
broker away under a running consumer and bring the same cluster back.

:class:`KafkaCluster` runs three such nodes as one cluster (one KRaft
quorum of three voters, replication factor 3, ``min.insync.replicas=2``),
the way production runs: a node can be killed and the others elect new
partition leaders while producers and consumers carry on.

``kcat`` (Debian's package, librdkafka) is the independent client used for
cross-checks; :func:`kcat_binary` installs it when missing and possible.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.ports import free_port

REPO = Path(__file__).resolve().parents[2]
POM = REPO / "tests" / "kafka" / "pom.xml"
CACHE = Path(os.environ.get("MMPIPE_CACHE", Path.home() / ".cache" / "mmpipe")) / "kafka"

SASL_USER = "mmpipe"
SASL_PASSWORD = "stream-secret-7d1f"  # test-only credential; the test checks it never reaches a log
SCRAM_USER = "mmpipe-scram"
SCRAM_PASSWORD = "scram-secret-41aa"


class KafkaUnavailable(RuntimeError):
    """The broker cannot be fetched or started here (the message says why)."""


def kafka_version() -> str:
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    if not m:
        raise KafkaUnavailable(f"{POM} names no kafka.version")
    return m.group(1)


def kafka_libs() -> Path:
    """The broker's jar directory, fetched with Maven on first use."""
    libs = CACHE / kafka_version() / "libs"
    done = libs / ".complete"
    if done.is_file():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaUnavailable("Maven (mvn) is not installed: it fetches the Kafka broker jars from Maven Central")
    if shutil.which("java") is None:
        raise KafkaUnavailable("java is not installed: the Kafka broker needs Java 17+")
    tmp = libs.with_name(f"libs.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
           "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise KafkaUnavailable("mvn dependency:copy-dependencies timed out after 900 s") from exc
    if res.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        raise KafkaUnavailable(f"mvn could not fetch the Kafka jars: {(res.stdout + res.stderr)[-1500:]}")
    (tmp / ".complete").write_text(kafka_version())
    shutil.rmtree(libs, ignore_errors=True)
    try:
        tmp.rename(libs)
    except OSError:  # another process won the race; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return libs


def kcat_binary() -> str | None:
    """Path of ``kcat`` (or ``kafkacat``), installing Debian's package as root if missing."""
    for name in ("kcat", "kafkacat"):
        if found := shutil.which(name):
            return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "kcat"]
        for update_first in (False, True):
            if update_first:
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
            if found := shutil.which("kcat"):
                return found
    return None


_LOG4J = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.server.name = kafka.server.KafkaServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class KafkaBroker:
    """One KRaft broker+controller process on loopback: a cluster of its own,
    or (``node_id``, ``voters``, ``cluster_id`` given by :class:`KafkaCluster`)
    one node of a larger one, whose internal topics are replicated
    ``replication`` times."""

    def __init__(self, root: Path | None = None, *, log_level: str = "WARN", node_id: int = 1,
                 controller_port: int | None = None, voters: str | None = None, cluster_id: str | None = None,
                 replication: int = 1, heap_mb: int = 768, format_now: bool = True,
                 flush_each_message: bool = True) -> None:
        self.libs = kafka_libs()
        self.root = Path(root or tempfile.mkdtemp(prefix="mmpipe-kafka-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.heap_mb = heap_mb
        self.expect_brokers = replication
        self.port, self.sasl_port = free_port(), free_port()
        self.controller_port = controller_port or free_port()
        self.log_file = self.root / "broker.log"
        self.proc: subprocess.Popen | None = None
        self._console = None
        data = self.root / "data"
        jaas = (
            'org.apache.kafka.common.security.plain.PlainLoginModule required '
            f'username="{SASL_USER}" password="{SASL_PASSWORD}" user_{SASL_USER}="{SASL_PASSWORD}";'
        )
        scram_jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node_id),
            "controller.quorum.voters": voters or f"{node_id}@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,"
                                              "CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": scram_jaas,
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": str(replication),
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": str(replication),
            "transaction.state.log.min.isr": str(min(2, replication)),
            "transaction.state.log.num.partitions": "3",
            "group.initial.rebalance.delay.ms": "0",
            "share.coordinator.state.topic.replication.factor": str(replication),
            "share.coordinator.state.topic.min.isr": str(min(2, replication)),
            "default.replication.factor": str(replication),
            "min.insync.replicas": str(min(2, replication)),
        }
        if replication == 1 and flush_each_message:
            # Survive the broker's own kill in the restart test (an fsync per
            # append: benchmarks turn it off, production brokers replicate).
            props["log.flush.interval.messages"] = "1"
        else:
            # A killed node is fenced (and its partitions get new leaders)
            # after 3 s without a heartbeat instead of the default 9 s.
            props.update({"broker.session.timeout.ms": "3000", "broker.heartbeat.interval.ms": "500",
                          "unclean.leader.election.enable": "false"})
        self.config = self.root / "server.properties"
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.root / "log4j2.properties").write_text(_LOG4J.format(log=self.log_file, level=log_level))
        self.cluster_id = cluster_id or new_cluster_id()
        if format_now:
            self.format().wait_ok()

    def format(self) -> _Running:
        """Start formatting this node's storage (every node of a cluster with
        the same cluster id); ``.wait_ok()`` on the result."""
        # The SCRAM user is created at format time, as the KRaft docs describe.
        args = ("format", f"--cluster-id={self.cluster_id}", "-c", str(self.config),
                "--add-scram", f"SCRAM-SHA-256=[name={SCRAM_USER},password={SCRAM_PASSWORD}]")
        return _Running(self._cmd("kafka.tools.StorageTool", *args), "kafka.tools.StorageTool format", 180)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def _cmd(self, main: str, *args: str) -> list[str]:
        return [
            "java", "-Xms128m", f"-Xmx{self.heap_mb}m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
            "-cp", f"{self.libs}/*", main, *args,
        ]

    def start(self, timeout: float = 180.0) -> None:
        """Start the broker and wait until a client gets cluster metadata."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._console = open(self.root / "console.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self._cmd("kafka.Kafka", str(self.config)), stdout=self._console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until this node serves metadata naming every broker of its cluster."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KafkaUnavailable(f"broker {self.node_id} exited with {self.proc.returncode}: {self.tail()}")
            if self._ready():
                return
            time.sleep(0.5)
        self.stop()
        raise KafkaUnavailable(f"broker {self.node_id} was not ready within {timeout:.0f} s: {self.tail()}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        except (KafkaError, OSError, ValueError):
            return False
        try:
            return len(admin.describe_cluster().get("brokers") or []) >= self.expect_brokers
        except (KafkaError, OSError, ValueError):
            return False
        finally:
            admin.close()

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 60 s; ``kill``: SIGKILL at once)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None
        if self._console is not None:
            self._console.close()
            self._console = None

    def create_topics(self, names: list[str], partitions: int = 1, configs: dict[str, str] | None = None) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=30000)
        try:
            admin.create_topics([NewTopic(n, partitions, 1, topic_configs=configs) for n in names], timeout_ms=30000)
        finally:
            admin.close()

    def tail(self, n: int = 3000) -> str:
        text = ""
        for f in (self.root / "console.log", self.log_file):
            if f.is_file():
                text += f.read_text(errors="replace")[-n:]
        return text

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class _Running:
    """A started helper command (storage format) whose success is awaited later."""

    def __init__(self, cmd: list[str], what: str, timeout: float) -> None:
        self.what, self.timeout = what, timeout
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_ok(self) -> None:
        try:
            out, _ = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.communicate()
            raise KafkaUnavailable(f"{self.what} timed out after {self.timeout:.0f} s") from exc
        if self.proc.returncode != 0:
            raise KafkaUnavailable(f"{self.what} failed: {out.decode(errors='replace')[-1500:]}")


class KafkaCluster:
    """Three KRaft nodes, each broker and controller, as one cluster on
    loopback: internal topics and new topics replicated 3 times,
    ``min.insync.replicas=2`` (acks=all survives one node down), and a
    node killed with SIGKILL is fenced within seconds so its partitions get
    new leaders.  Nodes are numbered 1..size."""

    def __init__(self, root: Path, size: int = 3, *, log_level: str = "WARN") -> None:
        ports = [free_port() for _ in range(size)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(ports))
        cluster_id = new_cluster_id()
        self.nodes = {
            i + 1: KafkaBroker(root / f"node-{i + 1}", log_level=log_level, node_id=i + 1, controller_port=port,
                               voters=voters, cluster_id=cluster_id, replication=size, heap_mb=512,
                               format_now=False)
            for i, port in enumerate(ports)
        }
        for running in [n.format() for n in self.nodes.values()]:
            running.wait_ok()

    @property
    def bootstrap(self) -> str:
        """Every node, comma-separated (what kafka-python and kcat take)."""
        return ",".join(n.bootstrap for n in self.nodes.values())

    @property
    def live_bootstrap(self) -> str:
        """The nodes running now (kafka-python's admin client gives up on a dead bootstrap server)."""
        return ",".join(n.bootstrap for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None)

    def start(self, timeout: float = 240.0) -> None:
        for n in self.nodes.values():
            n.launch()  # together: the quorum needs a majority before anyone is ready
        for n in self.nodes.values():
            n.wait_ready(timeout)

    def kill(self, node_id: int) -> None:
        """``kill -9`` one node."""
        self.nodes[node_id].stop(kill=True)

    def restart(self, node_id: int, timeout: float = 240.0) -> None:
        node = self.nodes[node_id]
        node.launch()
        node.wait_ready(timeout)

    def ensure_running(self) -> None:
        """Bring back any node a test killed."""
        down = [i for i, n in self.nodes.items() if n.proc is None or n.proc.poll() is not None]
        for i in down:
            self.nodes[i].launch()
        for i in down:
            self.nodes[i].wait_ready()

    def create_topics(self, names: list[str], partitions: int = 1, *, replicas: list[int] | None = None) -> None:
        """Topics replicated on every node; ``replicas`` fixes the replica
        order of every partition (its first node is the preferred leader)."""
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.live_bootstrap, request_timeout_ms=30000)
        try:
            if replicas is None:
                topics = [NewTopic(n, partitions, len(self.nodes)) for n in names]
            else:
                topics = [NewTopic(n, -1, -1, replica_assignments={p: replicas for p in range(partitions)})
                          for n in names]
            admin.create_topics(topics, timeout_ms=30000)
        finally:
            admin.close()
        self.wait_leaders(names, partitions)

    def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> node id of its current leader (-1: none).  Right
        after a kill the metadata may still name the dead node, and the admin
        client may pick it: try again for a while."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + 30
        while True:
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.live_bootstrap, request_timeout_ms=10000)
                try:
                    desc = admin.describe_topics([topic])
                finally:
                    admin.close()
                return {p["partition_index"]: p["leader_id"] for d in desc for p in d["partitions"]}
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait_leaders(self, names: list[str], partitions: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            while True:
                got = self.leaders(name)
                if len(got) == partitions and all(v >= 0 for v in got.values()):
                    break
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"topic {name} has no leader for every partition: {got}")
                time.sleep(0.2)

    def tail(self, n: int = 2000) -> str:
        return "".join(f"--- node {i}\n{node.tail(n)}" for i, node in self.nodes.items())

    def close(self) -> None:
        for n in self.nodes.values():
            n.stop(kill=True)
        for n in self.nodes.values():
            n.close()
