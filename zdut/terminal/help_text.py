"""What ``zdut help`` prints: the synopsis, the options and the description, shared by the CLI and the shell."""

from __future__ import annotations

SYNOPSIS = """SYNOPSIS
    zdut [options] [list [--match GLOB]]
    zdut [options] agents
    zdut [options] forget <agent>
    zdut [options] <device> [help]
    zdut [options] <device> <command> [args...]
    zdut [options] <device> <command> help
    zdut [options] <device> lock [duration] [--wait MAX]
    zdut [options] <device> unlock [force]
    zdut [options] <device> watch [-n N]
    zdut [options] <device> log [-n N] [--since TIME] [--follow]
    zdut [options] shell [options]
    zdut version
    zdut help
"""

OPTIONS = """OPTIONS
    -s ADDR        server (zdut-broker or zdut-agent) as host:port or tcp://host:port, or several
                   brokers of one lab, comma-separated: the first that answers is used
                   (default $ZDUT_SERVER, else the config file's server, else localhost:1024)
    -f FORMAT      output format: text (default), json, yaml, oneline (alias csv)
    -v             verbose: include metadata (server, device, command) in the output
    --no-color     disable colours (they are only used on a terminal anyway)
    -u USER        identity for locks and runs (default: the key's name with a key, else
                   $USER@hostname; a server with security on refuses any other name)
    --key FILE     your secret key (NAME.key_secret, from `zdut keys generate NAME`): talk CURVE
                   as user NAME (default $ZDUT_KEY, else the config file's key)
    --server-key FILE
                   the server's public key (default $ZDUT_SERVER_KEY, else the config file's
                   server_key); --key and --server-key go together
    --log LEVEL    client log: warn (default, summary at exit), debug (live), none
    --version      show the version (as `zdut version`)
    -h, --help     show this help (as `zdut help`)
"""

HELP = f"""zdut - reach lab devices (serial consoles, power, flashers, GPIO, IPMI) by name.

{SYNOPSIS}
DESCRIPTION
    Without arguments, or with `list`, lists the devices the server knows and their locks;
    `list --match GLOB` only those whose names match (such as 'rack3-*'), filtered by the server.
    `agents` lists the agents behind a broker; `forget` drops an offline agent and its devices
    from a broker (and its state file), so that a device locked there can move to another agent.
    `keys generate NAME [--dir DIR]` writes a CurveZMQ key pair (NAME.key, NAME.key_secret);
    `keys show FILE` prints its public key (`zdut keys -h`).
    With a device, lists its commands; with a
    command, runs it: output streams as it arrives, stdin is forwarded (raw mode on a terminal
    for interactive commands: Ctrl-] then . detaches, b sends a serial break, ? lists the
    keys), and files the command names are transferred.
    `help` after a command shows its usage. `lock` reserves a device (default 30m, Go duration
    syntax such as 1h30m); with --wait MAX it waits up to MAX in the device's queue, first
    come first served, showing its place on a terminal (the device may then be a comma list
    or a glob such as 'board-*': the first to be free is taken, and named); `unlock force`
    breaks anyone's lock and cancels their sessions on the device. `watch` follows, read-only,
    what every session on the device prints (it replays the last N lines first, default 50;
    anyone may watch, a watcher that cannot keep up is told how much it missed, the owner is
    told who watches; Ctrl-C leaves). `log` reads
    the device's journal at its agent: who ran what, when, its exit and output, and lock
    events (the last N lines, default 50; --since 10m or 2026-12-02T21:00; --follow goes on
    with what comes; -f json gives one record a line).
    Flags go before the device.
    Exit status: 0 success, 1 error, 2 bad flag or config file, 130 interrupted, 141 output
    closed (as by head).

{OPTIONS}
FILES
    $XDG_CONFIG_HOME/zdut/config.toml (default ~/.config/zdut/config.toml): the server to use
    without -s or $ZDUT_SERVER (one, or a comma-separated list of brokers), and the keys for servers
    with security on, as paths (relative ones to the file's directory). A server's table wins over
    [default] field by field; --key/--server-key and $ZDUT_KEY/$ZDUT_SERVER_KEY win over both:
        [default]
        server = "lab1:1024,lab2:1024"
        key = "alice.key_secret"
        server_key = "lab.key"
        [servers."lab2:1024"]
        server_key = "lab2.key"
"""
