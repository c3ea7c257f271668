"""Stages: one plain function per CLI verb, callable without the CLI."""
