"""fedsim's ClientApp: a thin Flower adapter around `fedsim.worker`.

One message in (the global weights, the round, the ids of the devices to simulate, the run
config as JSON), one message out (a row per trained device). The wire format lives in
`fedsim.wire` so the ServerApp reads exactly what this writes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from fedsim import secure_rounds, wire
from fedsim.transport import FAULT_KEY
from fedsim.worker import get_worker

app = ClientApp()
WORKER_SETUP_FAILED = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
NODE_DATA_KEY = "fedsim-data"  # flower-supernode --node-config "fedsim-data='/data/femnist'"


def local_config(config_json: str, context: Context) -> str:
    """The run's config as this worker uses it: a SuperNode started with the node config entry
    `fedsim-data` reads the dataset from that path (its copy of the data) instead of
    dataset.path, for machines that keep the data at different places."""
    path = context.node_config.get(NODE_DATA_KEY)
    if not path:
        return config_json
    raw = json.loads(config_json)
    if "path" not in raw.get("dataset", {}):
        return config_json  # a dataset without files (synthetic, a hub name): nothing to relocate
    raw["dataset"]["path"] = str(path)
    return json.dumps(raw, sort_keys=True)


def obey_fault(msg: Message) -> None:
    """Chaos (faults.worker_*, fedsim.transport.worker_faults): a job may tell this worker to
    die (SIGKILL: no reply, no goodbye) or to stop for a while (SIGSTOP; a detached helper
    process sends SIGCONT), as a crashed or frozen machine would."""
    job = wire.records(msg.content, ConfigRecord).get("job")
    fault = str(job.get(FAULT_KEY, "")) if job is not None else ""
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.startswith("pause:"):
        seconds = float(fault.split(":", 1)[1])
        subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.kill(os.getpid(), signal.SIGSTOP)


@app.train()
def train(msg: Message, context: Context) -> Message:
    obey_fault(msg)
    job = wire.read_job(msg.content)  # everything a worker needs travels in the message
    try:
        worker = get_worker(local_config(job.config_json, context))
    except Exception as err:  # noqa: BLE001 - reported to the server in the worker's own words
        # A worker that cannot load its data (or build its model) says so, with its host, in
        # one line: the server logs it and puts it in the round's metrics (worker_errors).
        reason = f"{type(err).__name__} on {socket.gethostname()}: {err}".splitlines()[0][:300]
        return Message(Error(code=WORKER_SETUP_FAILED, reason=f"worker setup failed: {reason}"), reply_to=msg)
    report = worker.train(job.global_params, job.round_num, job.device_ids, clip_norm=job.clip_norm, groups=job.groups,
                          arrays=job.arrays, sums=job.sums, sum_range=job.sum_range)  # fmt: skip
    return Message(content=wire.write_report(report), reply_to=msg)


@app.train("secagg")
def secagg_stage(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage for this worker's devices (see fedsim.secure_rounds)."""
    obey_fault(msg)
    return secure_rounds.handle(msg, context, lambda config_json: get_worker(local_config(config_json, context)))
