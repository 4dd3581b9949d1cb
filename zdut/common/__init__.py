"""Small helpers any zdut program may use: durations, logging, malloc tuning, flags, paths, backoff."""
