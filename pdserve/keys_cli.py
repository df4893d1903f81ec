"""``pdserve keys``: manage API keys and tenant limits in a key store (a file or Redis).

    pdserve keys --store keys.yaml add --tenant acme      # prints the new key ONCE
    pdserve keys --store keys.yaml list                   # key ids, tenants, revoked flags
    pdserve keys --store keys.yaml revoke pdsk_0123456789ab
    pdserve keys --store keys.yaml tenant acme --max-inflight 8 --rate 5 --salt-group public

``--store`` defaults to ``$PDSERVE_API_KEYS``; ``redis://HOST:PORT/DB`` selects Redis (keys under
``--redis-prefix``). Only hashes are stored; a lost key cannot be recovered, only revoked and
replaced. Running servers pick every change up on their next request (no restart).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pdserve.auth.keys import DEFAULT_REDIS_PREFIX, KeyStore, issue_key, open_key_store, revoke_key
from pdserve.auth.tenants import TenantPolicy, check_name
from pdserve.errors import InvalidRequestError

ENV_STORE = "PDSERVE_API_KEYS"


def _store(a: argparse.Namespace) -> KeyStore:
    spec = a.store or os.environ.get(ENV_STORE)
    if not spec:
        raise InvalidRequestError(f"name the key store: --store FILE|redis://... (or set ${ENV_STORE})")
    return open_key_store(spec, create=True, redis_prefix=a.redis_prefix)


def _cmd_add(a: argparse.Namespace) -> int:
    store = _store(a)
    key, rec = issue_key(store, a.tenant)
    print(key)  # stdout: the key alone, so `KEY=$(pdserve keys add ...)` works
    print(
        f"added {rec.key_id} for tenant {rec.tenant!r} in {store.describe()}; "
        "the key is shown only now: store it safely",
        file=sys.stderr,
    )
    return 0


def _cmd_revoke(a: argparse.Namespace) -> int:
    store = _store(a)
    rec = revoke_key(store, a.key_id)
    print(f"revoked {rec.key_id} (tenant {rec.tenant!r}); it is refused from the next request on")
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    store = _store(a)
    recs = store.records()
    if not recs:
        print(f"no keys in {store.describe()}")
        return 0
    print(f"{'KEY ID':<18} {'TENANT':<24} {'CREATED (UTC)':<20} STATE")
    for r in recs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_unix_s))
        print(f"{r.key_id:<18} {r.tenant:<24} {created:<20} {'revoked' if r.revoked else 'active'}")
    return 0


def _cmd_tenant(a: argparse.Namespace) -> int:
    store = _store(a)
    check_name(a.tenant)
    raw = TenantPolicy.from_dict(store.policy(a.tenant).to_dict()).to_dict()  # current settings
    for flag, key in (
        ("max_inflight", "max_inflight"),
        ("rate", "rate_per_s"),
        ("burst", "burst"),
        ("max_lease_ttl", "max_lease_ttl_s"),
        ("max_prompt_bytes", "max_prompt_bytes"),
        ("salt_group", "salt_group"),
    ):
        v = getattr(a, flag)
        if v is not None:
            raw[key] = v
    policy = TenantPolicy.from_dict(raw, f"tenant {a.tenant!r}")
    store.put_policy(a.tenant, policy)
    shown = ", ".join(f"{k}={v!r}" for k, v in policy.to_dict().items()) or "defaults"
    print(f"tenant {a.tenant!r}: {shown}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pdserve keys`` to the top-level parser."""
    k = sub.add_parser("keys", help="manage API keys and tenant limits (add / revoke / list / tenant)")
    k.add_argument(
        "--store", default=None, help=f"key file (YAML/JSON) or redis:// URL (default ${ENV_STORE})"
    )
    k.add_argument("--redis-prefix", default=DEFAULT_REDIS_PREFIX, help="key prefix in Redis")
    ks = k.add_subparsers(dest="keys_command", required=True)
    add = ks.add_parser("add", help="create a key for a tenant (prints it once)")
    add.add_argument("--tenant", required=True, help="the tenant the key authenticates as")
    add.set_defaults(func=_cmd_add)
    rv = ks.add_parser("revoke", help="revoke a key by id")
    rv.add_argument("key_id", help="the key id (pdsk_<12 hex>, as `list` shows it)")
    rv.set_defaults(func=_cmd_revoke)
    ls = ks.add_parser("list", help="list key ids, tenants and states (never the keys)")
    ls.set_defaults(func=_cmd_list)
    t = ks.add_parser("tenant", help="set a tenant's limits (unset flags keep their value)")
    t.add_argument("tenant", help="tenant name")
    t.add_argument("--max-inflight", type=int, default=None, help="requests in flight at once")
    t.add_argument("--rate", type=float, default=None, help="requests per second (token bucket)")
    t.add_argument("--burst", type=int, default=None, help="token bucket size (default: ceil(rate))")
    t.add_argument("--max-lease-ttl", type=float, default=None, help="KV lease TTL cap, seconds")
    t.add_argument("--max-prompt-bytes", type=int, default=None, help="UTF-8 bytes of prompt text")
    t.add_argument("--salt-group", default=None, help="share the prefix cache with this group ('' = private)")
    t.set_defaults(func=_cmd_tenant)
