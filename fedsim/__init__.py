"""fedsim: a privacy-preserving federated learning simulator on Flower.

A *device* is a simulated phone (an id, its data, its privacy ledger entry); a *worker* is a
Flower SuperNode that trains the devices named in each message one after another. See
docs/architecture.md.
"""

__version__ = "0.1.0"

__all__ = ["SimulationResult", "simulate"]


def __getattr__(name: str) -> object:
    # fedsim.simulate without importing torch, Hydra and Flower on `import fedsim`.
    if name in __all__:
        from fedsim import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
