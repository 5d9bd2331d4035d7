"""CPU of moving a worker's reply to the launcher: fedsim's worker-pool transport against pickle
over multiprocessing's Connection (what the pool used before 2026-12-03).

The reply is a Flower RecordDict holding `--vectors` masked vectors of `--length` uint32 values
packed as fedsim packs them (`fedsim.wire.pack`: a Flower Array of raw little-endian bytes), the
shape of a faithful SecAgg+ masked-input reply (500 devices of the 113,610-parameter MLP of
bench/secagg.py: 227 MB). A forked child sends it over a Unix socket pair; the parent receives
and unpickles it. Printed per way and run: the sender's and the receiver's CPU seconds
(user + system, `getrusage`), the receiver's wall seconds and its minor page faults.

    python bench/transport.py                     # 500 x 113,610 values, 4 runs of each way
    python bench/transport.py --vectors 50 --length 857930
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import socket
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def measure(way: str, payload: object) -> tuple[float, float, float, int]:
    """(sender CPU s, receiver CPU s, receiver wall s, receiver page faults) of one transfer."""
    from fedsim import local_workers

    parent, child = socket.socketpair()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sender
        parent.close()
        child.recv(1)
        cpu0, _ = _usage()
        if way == "pickle + Connection":
            Connection(os.dup(child.fileno())).send_bytes(pickle.dumps(payload, pickle.HIGHEST_PROTOCOL))
        else:
            local_workers.send(child, local_workers.dumps(payload))
        os.write(report_w, repr(_usage()[0] - cpu0).encode())
        os._exit(0)
    child.close()
    os.close(report_w)
    parent.send(b"x")
    cpu0, faults0 = _usage()
    t0 = time.perf_counter()
    if way == "pickle + Connection":
        received = Connection(os.dup(parent.fileno())).recv()
    else:
        received = local_workers.recv(parent)
    wall = time.perf_counter() - t0
    cpu1, faults1 = _usage()
    del received
    sent_cpu = float(os.read(report_r, 64).decode())
    os.close(report_r)
    os.waitpid(pid, 0)
    parent.close()
    return sent_cpu, cpu1 - cpu0, wall, faults1 - faults0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=500)
    ap.add_argument("--length", type=int, default=113_610)
    ap.add_argument("--runs", type=int, default=4, help="transfers of each way, interleaved")
    args = ap.parse_args()

    import numpy as np
    from flwr.app import ArrayRecord, RecordDict

    from fedsim.wire import pack

    rng = np.random.default_rng(0)
    vectors = {str(i): pack(rng.integers(0, 2**32, args.length, dtype=np.uint32)) for i in range(args.vectors)}
    payload = RecordDict({"masked": ArrayRecord(vectors)})
    print(f"{args.vectors} vectors x {args.length:,} uint32 = {args.vectors * args.length * 4 / 1e6:.0f} MB a transfer")
    for run in range(args.runs):
        for way in ("pickle + Connection", "fedsim.local_workers"):
            sent, got, wall, faults = measure(way, payload)
            print(f"  run {run + 1} {way:21}: sender {sent:.3f} s CPU, receiver {got:.3f} s CPU, {wall:.3f} s wall, "
                  f"{faults:,} page faults", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
