"""Benchmarks: `balanceiq bench ...`, each printing one JSON object with --json."""
