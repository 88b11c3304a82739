"""The request queue: per-model tiers, weighted fair queueing across users, aging,
backpressure, deadlines and leases, all applied atomically inside Redis.

``policy`` is the plain-Python statement of the ordering rule (tests check the Lua
against it); ``queue`` is what the API and the workers call.
"""
