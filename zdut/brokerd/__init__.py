"""Internals of ``zdut-broker`` (entry point ``zdut.broker``): registry, SQLite store, session tables, outbox."""
