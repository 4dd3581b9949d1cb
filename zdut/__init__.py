"""zdut: reach lab hardware (serial consoles, power switches, flashers, GPIO, IPMI) by name, over ZeroMQ.

The package's one version lives in its installed metadata (pyproject.toml); everything else reads it here.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zdut")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
