"""fedmed: federated learning for hospital consortia with site-enforced privacy guarantees."""

__version__ = "0.1.0"
