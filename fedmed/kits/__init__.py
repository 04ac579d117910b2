"""Kits: the YAML files a site or the coordinator is given (site kit, server kit, key files)."""
