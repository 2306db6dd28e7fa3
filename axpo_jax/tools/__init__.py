"""Tools the agent calls (schemas now; the executor and implementations come with the rollout engine)."""
