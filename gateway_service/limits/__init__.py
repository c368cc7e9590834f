"""Rate limits (per user type and tier, shared through Redis) and monthly quotas."""
