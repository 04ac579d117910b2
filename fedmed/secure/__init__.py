"""Secure aggregation glue: SecAgg+ parameters, the site-side gate and range check, and the
coordinator's workflow that records dropouts."""
