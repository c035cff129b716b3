"""The IMDS token client: retries within a deadline, the per-node upstream budget, its metrics."""
