"""Unit tests of pure logic."""
