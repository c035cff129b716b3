"""Load and scale benchmarks, each measured against a minimal baseline in the same run."""
