"""A SuperLink and SuperNodes on loopback for the deployment-engine tests (test_deployment.py,
test_deployment_faults.py): each test starts its own as local processes, runs fedsim through
them, and compares with the in-process run of the same config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedsim.config import SIMULATION_ENV, from_dict
from fake_grid import run_local
from helpers import free_port, listening

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
        # Deployment processes are not the simulation engine: never hand them its mark, which this
        # test process may carry (tests/fake_grid.py's LocalGrid sets it for in-process workers).
        self.env.pop(SIMULATION_ENV, None)
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

