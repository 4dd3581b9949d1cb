"""Terminal front ends' parts (``zdut`` and ``zdut shell``): output formats, console bridging, REPL pieces."""
