"""Test support shared by the test suite and the benches (like ``torch.testing``): real servers on
loopback and builders of small test artifacts. Nothing in the library imports it."""
