"""Configuration: loading with line numbers, schema, validation."""
