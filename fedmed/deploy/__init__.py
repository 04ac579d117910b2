"""Multi-hospital deployment: certificates and keys, SuperLink / SuperNode launchers."""
