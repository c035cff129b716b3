"""Getting tokens: the cache, its refresh policy, the upstream limiter and the token sources."""
