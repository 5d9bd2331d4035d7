"""SCAFFOLD: Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", Algorithm 1 with option II for the control-variate update.

Server state: the global control variate c, and one control variate c_i per device (kept in
a disk-backed fedsim.strategies.control_store.ControlStore: only the devices that trained
have a row; at start every c_i = 0 and c = 0). Per round, for each sampled device i:

    device:  y <- x;  K local steps  y <- y - eta_l (g_i(y) - c_i + c)        (Alg. 1, l. 10)
             returns Delta y_i = y - x
    server:  c_i+ = c_i - c + (x - y) / (K eta_l)                            (option II, l. 12)
             x <- x + eta_g * mean_i Delta y_i                                  (l. 16)
             c <- c + (1/N) sum_i (c_i+ - c_i)                                  (l. 17)

Where fedsim differs, and why:
- c_i+ is computed on the server from the update the device sends (option II uses nothing
  else: x, y, K and eta_l), so a reply carries the usual update only, not a second vector.
  The simulated device's c_i lives in the server's store, sent with the job.
- mean_i Delta y_i is fedsim's example-weighted mean (as every strategy here), not the
  paper's unweighted one; K is the device's number of local steps, epochs * ceil(n_i / B)
  (clients.training.local_steps, the rule the trainers follow). N is the population.
- With DP-SGD on the devices (privacy.dpsgd), the correction c - c_i is added to the noised
  gradient: a function of earlier releases (post-processing, no privacy cost) and of the
  server's state. SCAFFOLD is refused with secure aggregation and with DP-FedAvg: it needs
  each device's update, and the c it derives from them would escape DP-FedAvg's noise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients import local_steps
from fedsim.config import FedsimConfig
from fedsim.reports import DeviceReport
from fedsim.strategies.base import Strategy
from fedsim.strategies.control_store import ControlStore

STORE_FILE = "scaffold_controls.f32"  # in <run dir>/strategy/


class Scaffold(Strategy):
    needs_device_updates = True
    vectorizable = False  # each device trains with its own correction c - c_i

    def __init__(self, cfg: FedsimConfig, num_params: int, run_dir: Path | None = None) -> None:
        super().__init__(cfg, num_params, run_dir)
        if run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedsim-scaffold-")
            folder = Path(self._tmp.name)
        else:
            self._tmp, folder = None, run_dir / "strategy"
        self.store = ControlStore(folder / STORE_FILE, num_params)
        self.c = torch.zeros(num_params, dtype=torch.float32)
        self.last_round = 0

    def describe(self) -> str | None:
        return (f"SCAFFOLD (Karimireddy et al. 2020, option II): control variates in {self.store.path} "
                f"({self.num_params * 4 / 1e6:.2f} MB per device that trains)")  # fmt: skip

    def job_arrays(self, round_num: int, device_ids: list[int]) -> dict[str, np.ndarray]:
        return {"scaffold_c": self.c.numpy()[None, :], "scaffold_ci": self.store.rows(device_ids)}

    @staticmethod
    def device_correction(arrays: dict[str, np.ndarray], row: int) -> torch.Tensor | None:
        return torch.from_numpy(arrays["scaffold_c"][0] - arrays["scaffold_ci"][row])

    def observe(self, round_num: int, reports: list[DeviceReport]) -> dict[str, Any]:
        a = self.cfg.algorithm
        rows = sorted(
            (d, u, n) for r in reports for d, u, n in zip(r.device_ids, r.updates, r.num_examples, strict=True)
        )
        ids = [d for d, _, _ in rows]
        old = self.store.rows(ids)
        c = self.c.numpy()
        new: dict[int, np.ndarray] = {}
        delta_c = np.zeros(self.num_params, dtype=np.float64)
        for i, (d, update, n) in enumerate(rows):
            steps = local_steps(n, local_epochs=a.local_epochs, batch_size=a.batch_size)
            # c_i+ = c_i - c + (x - y) / (K eta_l), with x - y = -update
            row = old[i] - c - update / np.float32(steps * a.lr)
            new[d] = row
            delta_c += row - old[i]  # float64, in device-id order
        self.store.write(round_num, new)
        self.c = (self.c.double() + torch.from_numpy(delta_c) / self.cfg.population).to(torch.float32)
        self.last_round = round_num
        return {"scaffold_control_norm": float(self.c.norm()), "scaffold_devices_stored": len(self.store.index)}

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c.clone(), "store": self.store.state_dict(self.last_round), "round": self.last_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = state["c"].clone()
        self.store.load_state_dict(state["store"])
        self.last_round = int(state["round"])

    def checkpointed(self, round_num: int, kept_rounds: list[int]) -> None:
        self.store.checkpointed(kept_rounds)

    def summary(self) -> dict[str, Any]:
        return super().summary() | {
            "control_variates": {
                "devices_stored": len(self.store.index),
                "file": str(self.store.path),
                "file_bytes": self.store.file_bytes(),
                "global_control_norm": float(self.c.norm()),
            }
        }

    def close(self) -> None:
        # Without checkpoints there is nothing to resume: the file goes.
        self.store.close(delete=self._tmp is not None or not self.cfg.checkpoint.every)
        if self._tmp is not None:
            self._tmp.cleanup()
