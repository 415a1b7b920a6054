"""Loopback fakes that tests (ours and users') can reuse."""
