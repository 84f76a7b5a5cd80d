"""rtb: install-probability models for real-time bidding logs."""

__version__ = "0.1.0"
