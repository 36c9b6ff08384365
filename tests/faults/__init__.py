"""Fault-injection tests: real workers and Redis servers started, killed and restarted."""
