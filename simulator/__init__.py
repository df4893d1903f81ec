"""Discrete-event simulator of a pdserve cluster and a DistServe-style placement planner.

The engine's scheduler and KV manager (``engine.scheduler``, ``engine.block_manager``) and the
router's placement policies (``router.policy``) run here unchanged; only the model is replaced
by a latency model (``simulator.latency``: Vidur operator tables, DistServe fits, or a profile
measured on the real engine by ``simulator.profile``).
"""
