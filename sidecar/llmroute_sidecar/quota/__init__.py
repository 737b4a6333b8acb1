"""Quota stores: the interface and its backends."""
