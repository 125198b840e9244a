"""The adapter conformance suite: one set of checks that every adapter must pass."""
