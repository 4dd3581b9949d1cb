"""What security costs (issue 12): the console echo and the file round trip with ``--keys`` on beside the same
set-up with security off, in the same run, alternating so that a noisy spell hits both.

Two labs run at once, each a broker and the demo agent registered with it: one without keys, one with
``zdut-broker --keys`` / ``zdut-agent --keys`` and a client key (a config.toml in a private XDG_CONFIG_HOME,
which the zdut CLI and the library both read).

    .venv/bin/python bench/bench_security.py [--lines 2000] [--mb 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_sessions import BIN, ROOT, _write_random, free_port, library_echo, machine_note, wait_listed, zdut_echo

from zdut.client import Client
from zdut.common import keys as keys_module
from zdut.common.client_config import ClientKeys, client_keys
from zdut.common.memtune import tune_malloc


class Site:
    """A broker and the demo agent registered with it, with or without keys."""

    def __init__(self, tmp: Path, secure: bool, config: Path) -> None:
        self.tmp, self.secure = tmp, secure
        self.broker, self.agent = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        broker_keys, agent_keys = [], []
        if secure:
            self._make_keys(config)
            broker_keys, agent_keys = ["--keys", str(tmp / "broker")], ["--keys", str(tmp / "agent")]
        env = {**os.environ, "XDG_STATE_HOME": str(tmp), "TMPDIR": str(tmp)}
        self.procs = [subprocess.Popen([str(BIN / "zdut-broker"), "-s", self.broker, "--state", str(tmp / "b.sqlite3"),
                                        "--log", "warn", *broker_keys], env=env)]
        self.procs.append(subprocess.Popen([str(BIN / "zdut-agent"), "-a", self.agent, "-c",
                                            str(ROOT / "conf/demo.yaml"), "--server", self.broker, "--name", "rack1",
                                            "--log", "warn", *agent_keys], env=env))
        for addr in (self.agent, self.broker):
            wait_listed(addr, addr)

    def _make_keys(self, config: Path) -> None:
        """Key dirs for both servers, a user key "bench", and the config.toml sections naming them."""
        cli, broker, agent = self.tmp / "cli", self.tmp / "broker", self.tmp / "agent"
        keys_module.generate("server", broker)
        for name in ("bench", "rack1"):
            keys_module.generate(name, cli)
        for d in (broker / "users", broker / "agents", agent / "users", agent / "brokers"):
            d.mkdir(parents=True)
        for d in (broker / "users", agent / "users"):
            shutil.copy(cli / "bench.key", d)
        shutil.copy(cli / "rack1.key", broker / "agents")
        shutil.copy(cli / "rack1.key_secret", agent / "server.key_secret")
        shutil.copy(cli / "rack1.key", agent / "server.key")
        shutil.copy(broker / "server.key", agent / "brokers" / "lab.key")
        with open(config, "a") as fh:
            for addr, server in ((self.broker, broker), (self.agent, agent)):
                fh.write(f'[servers."{addr}"]\nkey = "{cli / "bench.key_secret"}"\n'
                         f'server_key = "{server / "server.key"}"\n\n')

    def keys(self, addr: str) -> ClientKeys | None:
        return client_keys(addr)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            p.wait(10)


def file_round_trip(addr: str, keys: ClientKeys | None, src: Path, out: Path) -> float:
    """MB/s of one upload + download of ``src`` through ``device3 file-transfer`` on the library."""
    size_mb = src.stat().st_size / 1e6

    async def go() -> float:
        async with Client(addr, keys=keys) as client:
            t = time.perf_counter()
            await client.run("device3", "file-transfer", [str(src), str(out)]).wait()
            return size_mb / (time.perf_counter() - t)

    return asyncio.run(go())


def p50_p99(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2], s[min(len(s) - 1, int(len(s) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2000, help="echo round trips per figure")
    ap.add_argument("--mb", type=int, default=256, help="file size of the round trips (MiB)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of off and on")
    args = ap.parse_args()
    tune_malloc()
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory(dir="/dev/shm") as f:
        tmp, files = Path(d), Path(f)
        os.environ["XDG_CONFIG_HOME"] = str(tmp / "config")
        for var in ("ZDUT_KEY", "ZDUT_SERVER_KEY"):
            os.environ.pop(var, None)
        config = tmp / "config" / "zdut" / "config.toml"
        config.parent.mkdir(parents=True)
        config.touch()
        (tmp / "off").mkdir()
        (tmp / "on").mkdir()
        sites = {"off": Site(tmp / "off", False, config), "on": Site(tmp / "on", True, config)}
        src = files / "in.bin"
        _write_random(src, args.mb)
        figures: dict[tuple[str, str], list[float]] = {}
        try:
            print(f"machine: {machine_note()}; {args.lines} echo lines, {args.mb} MiB files, {args.rounds} rounds")
            for i in range(args.rounds):
                for name, site in sites.items():
                    for path, addr in (("direct", site.agent), ("broker", site.broker)):
                        keys = site.keys(addr)
                        assert (keys is not None) == site.secure, (name, addr)
                        p50, p99 = p50_p99(library_echo(addr, args.lines, keys))
                        cli50, _ = p50_p99(zdut_echo(addr, args.lines))
                        mbs = file_round_trip(addr, keys, src, files / "out.bin")
                        for what, v in (("echo p50", p50), ("echo p99", p99), ("cli echo p50", cli50),
                                        ("file MB/s", mbs)):
                            figures.setdefault((f"{path} {what}", name), []).append(v)
                        print(f"round {i + 1} security {name:3} {path:6}: library echo p50 {p50 * 1e6:4.0f} "
                              f"p99 {p99 * 1e6:4.0f} us, CLI echo p50 {cli50 * 1e6:4.0f} us, file {mbs:4.0f} MB/s",
                              flush=True)
            print("medians over the rounds        security off   security on   on/off")
            for path in ("direct", "broker"):
                for what in ("echo p50", "echo p99", "cli echo p50", "file MB/s"):
                    off = statistics.median(figures[(f"{path} {what}", "off")])
                    on = statistics.median(figures[(f"{path} {what}", "on")])
                    unit, scale = ("MB/s", 1.0) if "MB/s" in what else ("us", 1e6)
                    print(f"  {path:6} {what:14}   {off * scale:8.0f} {unit:4}  {on * scale:8.0f} {unit:4}  "
                          f"{on / off:6.2f}x")
        finally:
            for site in sites.values():
                site.close()


if __name__ == "__main__":
    main()
