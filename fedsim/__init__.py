"""fedsim: a privacy-preserving federated learning simulator on Flower.

A *device* is a simulated phone (an id, its data, its privacy ledger entry); a *worker* is a
Flower SuperNode that trains the devices named in each message one after another. See
docs/architecture.md.
"""

__version__ = "0.1.0"
