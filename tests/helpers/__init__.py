"""Test helpers shared by several test modules (not fixtures: import what you need)."""
