"""The weight policy: CFR-RL critical-endpoint selection, its linear program, and baselines."""
