"""Code that stands for third-party packages, and a way to install it the way pip would (a dist-info)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def install(site: Path, dist: str, entry_points: dict[str, dict[str, str]]) -> Path:
    """Write ``<site>/<dist>-1.0.dist-info`` declaring ``entry_points`` (group -> name -> value); returns site."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 1.0\n")
    text = "".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items())
        for group, entries in entry_points.items()
    )
    (info / "entry_points.txt").write_text(text)
    return site


def install_shelly(site: Path) -> Path:
    """The Shelly PDU backend (``thirdparty.zdut_shelly``, importable with tests/ on the path) as vendor shelly."""
    return install(site, "zdut_shelly", {"zdut.pdu_backends": {"shelly": "thirdparty.zdut_shelly"}})
