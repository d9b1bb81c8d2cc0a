"""The platform layer: tenants, their sending domains, SMTP credentials, API keys and quotas.

- `model`   pure values: Tenant, Quota, TenantError and the name/domain/username rules;
- `secrets` password and API-key hashing (scrypt) and API-key syntax;
- `tenants` TenantDirectory: SQLite (`<spool_dir>/state.db`) + the in-memory table the hot
  path reads;
- `quotas`  QuotaTracker: per-tenant token bucket and hourly/daily windows (pure);
- `views`   the admin API's tenant bodies, shared by mtad.http.tenantapi and mtactl;
- `verp`    signed VERP return paths (bounces+<queue id>-<tag>@<bounce domain>) and their key;
- `sentlog` which tenant, Message-ID and recipients a VERP-signed message had (attribution);
- `suppress` the suppression list (SQLite + memory) and its hard/soft/complaint policy;
- `suppressviews` the suppression list's admin bodies, shared by mtad.http.suppressapi and mtactl;
- `feedback` bounces and complaints to VERP addresses, our own delivery's bounces -> policy.

This package imports nothing heavy at import time, so mtactl can use `views` and start fast.
"""
