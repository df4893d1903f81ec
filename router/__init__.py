"""Router: API frontends, placement policies (pure, in :mod:`router.policy`), admission, failover."""
