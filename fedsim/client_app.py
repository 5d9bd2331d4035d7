"""fedsim's ClientApp: a thin Flower adapter around `fedsim.worker`.

One message in (the global weights, the round, the ids of the devices to simulate, the run
config as JSON), one message out (a row per trained device). The wire format lives in
`fedsim.wire` so the ServerApp reads exactly what this writes.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsim import secure_rounds, wire
from fedsim.worker import get_worker

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    del context  # everything a worker needs travels in the message
    job = wire.read_job(msg.content)
    worker = get_worker(job.config_json)
    report = worker.train(job.global_params, job.round_num, job.device_ids, clip_norm=job.clip_norm)
    return Message(content=wire.write_report(report), reply_to=msg)


@app.train("secagg")
def secagg_stage(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage for this worker's devices (see fedsim.secure_rounds)."""
    return secure_rounds.handle(msg, context, get_worker)
