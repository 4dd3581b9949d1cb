"""Internals of ``zdut-broker`` (entry point ``zdut.broker``, which dispatches): inbox, outbox, sessions,
registry, membership, timers, autosave and the SQLite store, one room each."""
