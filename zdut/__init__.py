"""zdut: reach lab hardware (serial consoles, power switches, flashers, GPIO, IPMI) by name, over ZeroMQ.

The package's one version is written here; pyproject.toml reads it (``dynamic``), so the installed metadata
says the same.  A literal, not ``importlib.metadata.version()``: that import costs every zdut process ~30 ms
of start-up, a sixth of a one-shot CLI call.
"""

__version__ = "0.1.0"
