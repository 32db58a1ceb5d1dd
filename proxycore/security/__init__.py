"""Admission: inbound auth, forward auth, policy, rate limits, secrets."""
