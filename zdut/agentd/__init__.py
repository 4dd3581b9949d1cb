"""Internals of ``zdut-agent`` (entry point ``zdut.worker``): config, locks, runs, broker uplinks."""
