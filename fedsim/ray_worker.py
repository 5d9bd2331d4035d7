"""What a Ray worker process of the simulation engine imports as it starts.

fedsim.run starts Ray with this module in `preload_python_modules` (see `fedsim.run._start_ray`
for when), so a worker imports fedsim's ClientApp (torch, Flower) while Ray is still starting,
and Flower's simulation package lazily (`flower_adapter.light_simulation_package`): the worker
then skips the simulation launcher that only the server process runs. Ray's serialization
add-ons (pyarrow and others, `fedsim.ray_lean`) are left out.
"""

from __future__ import annotations

import importlib

from fedsim import flower_adapter, ray_lean

ray_lean.skip_serialization_addons()  # before this process's serialization context is made
flower_adapter.light_simulation_package()
importlib.import_module("fedsim.client_app")  # after the line above: the ClientApp's imports, now
