"""The wire machinery agent and client share: sockets on the asyncio loop, Run streams, file transfers."""
