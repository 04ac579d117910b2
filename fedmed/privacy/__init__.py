"""Site-side differential privacy: accounting, noise calibration and the signed privacy ledger."""
