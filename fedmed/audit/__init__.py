"""Tools for privacy auditors: verify ledgers, recompute epsilon, report, audit empirically."""
