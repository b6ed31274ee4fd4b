"""baton.v1 protos."""
