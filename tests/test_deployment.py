"""The same fedsim app on Flower's deployment engine: a SuperLink and SuperNodes on loopback.

Each test starts its own SuperLink and SuperNodes as local processes (insecure mode), runs a
short experiment through them with `fedsim engine=deployment superlink=127.0.0.1:PORT`, and
compares with the in-process simulation of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.config import from_dict
from fedsim.run import run
from fake_grid import run_local
from helpers import free_port, listening

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent


def self_signed(tmp: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - day).not_valid_after(now + day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + day)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return paths


class Cluster:
    """A SuperLink and SuperNodes as local processes (TLS with a throwaway CA, or insecure);
    `stop()` ends them all."""

    def __init__(self, tmp: Path, *, tls: bool = False) -> None:
        self.tmp, self.port, self.procs, self.nodes = tmp, free_port(), [], []
        self.ca: Path | None = None
        security = ["--insecure"]
        if tls:
            self.ca, cert, key = self_signed(tmp)
            security = ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        # The SuperLink starts `flower-superexec` (and SuperNodes their app processes) by name:
        # the venv's bin must be on PATH even when pytest runs as .venv/bin/python.
        self.env = {**os.environ, "FLWR_LOG_LEVEL": "WARNING", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.log = tmp / "superlink.log"
        link = self._start(
            ["flower-superlink", *security, "--port", str(self.port), "--disable-runtime-dependency-installation"],
            self.log,
        )
        deadline = time.monotonic() + 120
        while not listening(self.port):
            if time.monotonic() > deadline or link.poll() is not None:
                raise AssertionError(f"the SuperLink did not listen on {self.port}; its log:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_node(self, node_config: str | None = None) -> subprocess.Popen:
        security = ["--root-certificates", str(self.ca)] if self.ca else ["--insecure"]
        cmd = ["flower-supernode", *security, "--superlink", self.address, "--port", str(free_port())]
        if node_config:
            cmd += ["--node-config", node_config]
        node = self._start(cmd, self.tmp / f"supernode{len(self.nodes)}.log")
        self.nodes.append(node)
        return node

    def _start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=self.env, cwd=self.tmp, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)  # the SuperNode and its ClientApp processes, no goodbye
        proc.wait(timeout=20)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


def synthetic(tmp: Path, **over: object) -> dict:
    raw = {
        "seed": 4, "population": 40, "rounds": 2, "cohort": {"size": 8, "sampling": "fixed"},
        "dataset": {"name": "synthetic", "size_max": 60}, "model": {"name": "mlp", "hidden_sizes": [16]},
        "simulation": {"num_workers": 2, "round_timeout_s": 60, "ray_temp_dir": str(tmp / "ray")},
        "output": {"progress": False},
    }  # fmt: skip
    for key, value in over.items():
        raw[key] = value
    return raw


def in_process(raw: dict, run_dir: Path) -> dict:
    """The same run on the in-process grid (fedsim's ClientApp, no SuperLink, no Ray): the
    deployed model must equal it bit for bit (test_simulation shows it equals the Ray engine's)."""
    local = json.loads(json.dumps(raw))
    local.update(engine="simulation", superlink=None)
    local["simulation"]["num_workers"] = 2
    return run_local(from_dict(local), run_dir)


def test_fedsim_on_a_superlink_over_tls_trains_the_in_process_model(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, tls=True)
    try:
        deployed_with_tls(cluster, tmp_path)
    finally:
        cluster.stop()


def deployed_with_tls(cluster: Cluster, tmp_path: Path) -> None:
    for _ in range(2):
        cluster.add_node()
    out = tmp_path / "deployed"
    cmd = [
        sys.executable, "-m", "fedsim", "engine=deployment", f"superlink={cluster.address}", f"superlink_ca={cluster.ca}",
        "seed=4", "population=40",
        "rounds=2", "cohort.size=8", "cohort.sampling=fixed", "dataset.size_max=60", "model=mlp", "model.hidden_sizes=[16]",
        "simulation.num_workers=2", "simulation.round_timeout_s=60", f"output.dir={out}", f"hydra.run.dir={out}",
        "privacy.randomness=reproducible",  # engine=deployment defaults to secure (never reproducible)
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "round 2/2" in proc.stderr  # the ServerApp's progress lines, streamed back
    for name in ("metrics.jsonl", "summary.json", "model.pt", "config.yaml"):
        assert (out / name).is_file(), name
    deployed = json.loads((out / "summary.json").read_text())
    assert deployed["num_workers"] == 2 and deployed["rounds"] == 2 and deployed["workers_lost"] == {}
    local = in_process(synthetic(tmp_path), tmp_path / "in_process")
    assert deployed["model_sha256"] == local["model_sha256"]

    from analysis import write_report

    assert write_report(out).is_file()  # the analysis reads the collected run directory unchanged


def start_run(cluster: Cluster, tmp_path: Path, raw: dict) -> tuple[subprocess.Popen, Path]:
    """fedsim on the cluster in a process of its own (so the test can act mid-run); returns it
    and its metrics.jsonl."""
    out = tmp_path / "deployed"
    raw.setdefault("privacy", {})["randomness"] = "reproducible"  # deployment defaults to secure (never reproducible)
    raw["output"]["dir"] = str(out)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw))
    script = "import json,sys; from fedsim.config import from_dict; from fedsim.run import run; " \
             "run(from_dict(json.load(open(sys.argv[1]))), sys.argv[2])"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script, str(cfg_file), str(out)], cwd=tmp_path, env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return proc, out / "metrics.jsonl"


def finish(proc: subprocess.Popen) -> str:
    """The run's output once it ends (generous: a round took 2 min on a loaded 2-core machine);
    a run that does not end is killed, not left behind."""
    try:
        return proc.communicate(timeout=1200)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_first_round(proc: subprocess.Popen, metrics: Path) -> None:
    deadline = time.monotonic() + 300  # generous: Flower's start-up on a loaded 2-core machine
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
        assert time.monotonic() < deadline, "round 1 did not finish within 300 s"
        time.sleep(0.2)


def test_a_supernode_killed_mid_run_loses_no_device_and_nothing_hangs(cluster: Cluster, tmp_path: Path) -> None:
    nodes = [cluster.add_node() for _ in range(3)]
    raw = synthetic(tmp_path, rounds=3, engine="deployment", superlink=cluster.address)
    # Groups of at most 3 devices (8 devices: 4 groups of 2): every worker has a job each round.
    # The kill comes after round 1, so every SuperNode's first ClientApp start (torch import,
    # tens of seconds on a loaded machine) is behind us; the round after the kill waits the
    # whole timeout for the dead worker. A live worker late under load is tolerated below.
    raw["simulation"] |= {"num_workers": 3, "round_timeout_s": 30, "device_group": 3}
    proc, metrics = start_run(cluster, tmp_path, raw)
    wait_for_first_round(proc, metrics)
    cluster.kill(nodes[0])
    output = finish(proc)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(metrics.with_name("summary.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 3
    # The killed worker is late (suspended) or, once the SuperLink stops listing it, lost. On a
    # loaded machine a live worker may be late too, but not lost (that takes 5 missed
    # deadlines in a row), and the killed one is one of the two.
    assert len(summary["workers_lost"]) <= 1 and summary["workers_late"] | summary["workers_lost"], summary
    # Its job went to the others: every sampled device trained...
    assert sum(r["devices_failed"] for r in rows) == 0 and sum(r["worker_retries"] for r in rows) >= 1
    # ... so the model is the in-process one, bit for bit.
    local = synthetic(tmp_path, rounds=3)
    local["simulation"]["device_group"] = 3
    assert summary["model_sha256"] == in_process(local, tmp_path / "local")["model_sha256"]


def test_a_supernode_paused_longer_than_the_timeout_is_kept_and_the_model_is_unchanged(
    cluster: Cluster, tmp_path: Path
) -> None:
    nodes = [cluster.add_node() for _ in range(2)]
    raw = synthetic(tmp_path, rounds=5, engine="deployment", superlink=cluster.address)
    # 4 groups of 2 over 2 workers: both have a job every round. The pause (40 s) is twice the
    # timeout and shorter than the SuperLink's patience (two 30 s heartbeat intervals); a loaded
    # machine may make healthy workers late too, so only the engine may drop a worker here
    # (max_missed_rounds 10) and a round has retries to spare.
    raw["simulation"] |= {"num_workers": 2, "round_timeout_s": 20, "max_missed_rounds": 10, "retries": 4,
                          "device_group": 3}  # fmt: skip
    proc, metrics = start_run(cluster, tmp_path, raw)
    wait_for_first_round(proc, metrics)
    os.killpg(nodes[0].pid, signal.SIGSTOP)  # the SuperNode and its ClientApp process
    try:
        time.sleep(40)
    finally:
        os.killpg(nodes[0].pid, signal.SIGCONT)
    output = finish(proc)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(metrics.with_name("summary.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert summary["workers_lost"] == {} and len(summary["workers_late"]) >= 1, summary
    assert all(r["workers_lost"] == 0 for r in rows) and sum(r["devices_failed"] for r in rows) == 0
    local = synthetic(tmp_path, rounds=5)
    local["simulation"]["device_group"] = 3
    assert summary["model_sha256"] == in_process(local, tmp_path / "local")["model_sha256"]


def test_a_worker_without_its_data_says_so_in_the_metrics(
    cluster: Cluster, tmp_path: Path, femnist_dir: Path
) -> None:
    cluster.add_node()
    cluster.add_node(node_config="fedsim-data='/nonexistent/femnist'")  # this machine has no copy of the data
    # One round: each round costs ~30 s here (ClientApp process start-ups and a retry), and
    # one shows the failed setup, the retry and that no device was lost.
    raw = synthetic(tmp_path, engine="deployment", superlink=cluster.address, population=20, rounds=1,
                    dataset={"name": "femnist", "path": str(femnist_dir.resolve())})  # fmt: skip
    raw["cohort"]["size"] = 6
    raw["simulation"]["device_group"] = 2  # 3 groups of 2: both workers get a job
    summary = run(from_dict(raw), tmp_path / "deployed")
    rows = [json.loads(line) for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()]
    errors = [e for r in rows for e in r.get("worker_errors", [])]
    assert errors and all("/nonexistent/femnist" in e and "worker setup failed" in e for e in errors), errors
    # The job went to the worker that has the data: no device was lost.
    assert sum(r["devices_failed"] for r in rows) == 0 and summary["rounds"] == 1 and rows[0]["devices_trained"] == 6


def test_when_no_worker_has_the_data_the_run_stops_with_one_line(
    cluster: Cluster, tmp_path: Path, femnist_dir: Path
) -> None:
    cluster.add_node(node_config="fedsim-data='/nonexistent/femnist'")
    out = tmp_path / "deployed"
    cmd = [
        sys.executable, "-m", "fedsim", "engine=deployment", f"superlink={cluster.address}", "dataset=femnist",
        f"dataset.path={femnist_dir.resolve()}", "population=20", "rounds=3", "cohort.size=4", "model=mlp", "model.hidden_sizes=[8]",
        "simulation.num_workers=1", "simulation.retries=0", f"output.dir={out}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedsim: error: round 1: every worker failed: worker ") and "/nonexistent/femnist" in last, last
    assert "Traceback" not in proc.stderr
    # Nothing lost: the run directory holds what the run did before it stopped.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["devices_trained"] == 0 and "/nonexistent/femnist" in rows[0]["worker_errors"][0]


def test_ctrl_c_stops_the_run_on_the_superlink_too(cluster: Cluster, tmp_path: Path) -> None:
    cluster.add_node()
    out = tmp_path / "deployed"
    cmd = [
        sys.executable, "-m", "fedsim", "engine=deployment", f"superlink={cluster.address}", "population=40", "rounds=40",
        "cohort.size=8", "dataset.size_max=60", "simulation.num_workers=1", f"output.dir={out}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    # Its own session, like a terminal's foreground job: Ctrl-C reaches fedsim and its `flwr run`.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("fedsim: interrupted: run ") and "stopped on the SuperLink" in err
    rows = len(metrics.read_text().splitlines())
    time.sleep(15)  # a round takes ~8 s here: a run still going would have logged another
    assert len(metrics.read_text().splitlines()) == rows < 40
