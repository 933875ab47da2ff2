"""lth: a JAX research harness for the Lottery Ticket Hypothesis and model compression."""

__version__ = "0.1.0"
