"""The run configuration: typed schema (ConfigStore) and composing conf/ with overrides."""
