"""Generic evaluation checks: the health checks that keep broken results from passing as results (health.py)."""
