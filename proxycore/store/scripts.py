"""The Lua scripts the shared state runs in Redis: each is one atomic ``EVALSHA`` (one round
trip), and each reads the server's clock (``TIME``), never a replica's.

GCRA (:data:`ADMIT`): a key holds its *theoretical arrival time* (TAT, microseconds). A request
at ``now`` is admitted when ``max(TAT, now) + interval - now <= burst * interval``; the new TAT
is stored with a TTL equal to the time until the bucket is full again (an idle key expires,
which is the same as a full bucket). This is the token bucket of
:class:`proxycore.security.ratelimit.TokenBucket` (``rate`` per second, capacity ``burst``,
starting full; a refusal costs nothing) in one number per key, so N replicas together admit
the configured rate.

Leases (:data:`ADMIT`, :data:`RENEW`, :data:`RELEASE`): a key's concurrent streams are the
members of a sorted set, one lease id per stream (``<replica>:<n>``), scored by the time the
lease expires. Acquire first drops expired leases, then admits if fewer than ``limit`` remain.
The holding replica renews its leases every third of the lease time; a replica that dies stops
renewing, and its streams stop counting within the lease time.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ADMIT", "RELEASE", "RENEW"]

#: KEYS[1] the bucket ('' if no rate), KEYS[2] the lease set ('' if no stream limit);
#: ARGV: rate (per second), burst, lease id, stream limit, lease (ms). Returns
#: ``{wait, held}``: ``wait`` 0 (admitted) or the microseconds until a token is available;
#: ``held`` 1 when a lease was taken (or none was needed), 0 when the key is at its limit.
#: Like the per-process limits, a request refused for streams has used its token.
ADMIT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if KEYS[1] ~= '' then
  local interval = 1000000 / tonumber(ARGV[1])
  local burst = tonumber(ARGV[2])
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local wait = new_tat - burst * interval - now
  if wait > 0 then return {math.ceil(wait), 0} end
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
             'PX', math.ceil((new_tat - now) / 1000) + 1)
end
if KEYS[2] == '' then return {0, 1} end
local ms = math.floor(now / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {0, 0} end
local lease = tonumber(ARGV[5])
redis.call('ZADD', KEYS[2], ms + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[2], lease * 2)
return {0, 1}
"""

#: KEYS: lease sets; ARGV: lease (ms), mode ('XX': only extend leases still there; '': also
#: re-add lost ones, after the server came back empty), then one lease id per key.
RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if ARGV[2] == 'XX' then
    redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 2])
  else
    redis.call('ZADD', key, now + lease, ARGV[i + 2])
  end
  redis.call('PEXPIRE', key, lease * 2)
end
return #KEYS
"""

#: KEYS: lease sets; ARGV: one lease id per key. Frees streams that ended.
RELEASE: Final = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""
