"""A budget shared by every process that names the same key: :class:`SharedBudget`.

A per-process budget multiplies by the number of workers. A :class:`SharedBudget` keeps one
limit in Redis (USD and/or tokens) for every process that uses the same *key*, for instance
``"acme:2026-12-01"`` for a tenant's day. Spending is two steps, each **one** server-side Lua
script, so there is no check-then-increment race between processes:

1. :meth:`SharedBudget.reserve` checks that what is spent plus what is held by running attempts
   plus the new hold stays within the limit, and records the hold, in one call. The same call
   sets the key's expiry when the key has none (``ttl_seconds``, counted from the first
   reservation), so there is never a key without an expiry left behind by a second command that
   did not run.
2. :meth:`SharedBudget.settle` replaces the hold by the actual spend (which may be more or less).
   :meth:`SharedBudget.release` settles with nothing spent.

Exactness: amounts are kept in Redis as integers, micro-dollars (1 USD = 1,000,000) and tokens;
floats exist only on the Python side and are converted once per call, rounded half up to the
micro-dollar (:func:`to_micros`). Totals never drift, whatever the number of calls.

Idempotence: every reservation has an id (random, or the caller's). Reserving again with an id
that is already held or settled changes nothing, and settling an id that was settled changes
nothing, so a client that retries a call after a lost reply (redis-py's own retry included)
never counts twice.

Leases: each hold expires ``lease_seconds`` after it was granted, by the Redis server's clock.
Expired holds are released by the next script call on that key (holds sit in a sorted set
scored by their expiry), so the holds of a process that died are returned to the budget within
``lease_seconds``. A settle that arrives after its hold expired still adds the actual spend.

The bound: the limit is exceeded only by attempts that cost more than they reserved. Over any
period, ``spent <= limit + sum(actual - reserved)`` over the attempts that overran their
reservation while running concurrently; an attempt whose actual cost is within its reservation
never pushes the total past the limit. Attempts that outlive their lease are the exception: their
hold is released while they still run, so keep ``lease_seconds`` above the longest attempt
(the step timeout is a good value to start from).

Keys: ``<key_prefix>{<key>}`` (a hash: totals, limits, one field per hold and per settled id) and
``<key_prefix>{<key>}:leases`` (the sorted set); the braces put both in one Redis Cluster slot, so
*key* must not contain braces. Settled ids are remembered until the key expires (about 60 bytes
each). Every process naming a key must use the same limits: the first reservation records them
and a different limit is refused with a :class:`~stroma.errors.ConfigurationError`.

Requires the ``redis`` extra (``pip install 'stroma[redis]'``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final
from urllib.parse import urlsplit

from stroma.checkpoint.redis import mask_url
from stroma.cost import BudgetExceeded, Dimension
from stroma.errors import ConfigurationError, StromaError
from stroma.fleet._redis import LazyRedis, text

__all__ = [
    "Reservation",
    "SharedBudget",
    "SharedBudgetError",
    "SharedBudgetExceeded",
    "SharedUsage",
    "to_micros",
]

logger = logging.getLogger("stroma")

MICROS_PER_USD: Final = 1_000_000
DEFAULT_KEY_PREFIX: Final = "stroma:budget:"
MAX_AMOUNT_MICROS: Final = 2**53 - 1
"""Largest amount (micro-dollars or tokens) kept exactly: Lua numbers are doubles."""
_MAX_STEPS_REMEMBERED: Final = 4096
_PURGE_BATCH: Final = 1000

# Shared by every script: Redis' own clock, dropping a hold, and releasing the holds whose lease expired.
_PRELUDE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, leases = KEYS[1], KEYS[2]
-- Drops reservation rid's hold and its lease; true if it had a hold.
-- Amounts are subtracted as 0 - x: -x of 0 is -0, which HINCRBY refuses.
local function drop_hold(rid)
  local hold = redis.call('HGET', state, 'h:' .. rid)
  redis.call('ZREM', leases, rid)
  if not hold then return false end
  local sep = string.find(hold, ':', 1, true)
  redis.call('HINCRBY', state, 'held_micros', 0 - tonumber(string.sub(hold, 1, sep - 1)))
  redis.call('HINCRBY', state, 'held_tokens', 0 - tonumber(string.sub(hold, sep + 1)))
  redis.call('HDEL', state, 'h:' .. rid)
  return true
end
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, PURGE_BATCH)
for _, rid in ipairs(expired) do
  if drop_hold(rid) then redis.call('HINCRBY', state, 'expired_holds', 1) end
end
local function keep_expiry(ttl)
  if redis.call('TTL', state) < 0 then redis.call('EXPIRE', state, ttl) end
  if redis.call('PTTL', leases) == -1 then redis.call('PEXPIRE', leases, redis.call('PTTL', state)) end
end
local function totals()
  local v = redis.call('HMGET', state, 'spent_micros', 'held_micros', 'spent_tokens', 'held_tokens')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
end
""".replace("PURGE_BATCH", str(_PURGE_BATCH))

# ARGV: id, micros, tokens, limit micros (-1: none), limit tokens (-1: none), lease ms, ttl s.
# Returns {status, spent micros, held micros, spent tokens, held tokens, dimension}:
# status 1 granted now, 2 already held (a retry), 3 already settled, 0 refused, -1 other limits.
_RESERVE = (
    _PRELUDE
    + """
local rid = ARGV[1]
local micros, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit_m, limit_t = ARGV[4], ARGV[5]
local sm, hm, st, ht = totals()
local known_m = redis.call('HGET', state, 'limit_micros')
local known_t = redis.call('HGET', state, 'limit_tokens')
if (known_m and known_m ~= limit_m) or (known_t and known_t ~= limit_t) then
  return {-1, sm, hm, st, ht, (known_m or '') .. '/' .. (known_t or '')}
end
if redis.call('HEXISTS', state, 'd:' .. rid) == 1 then return {3, sm, hm, st, ht, ''} end
if redis.call('HEXISTS', state, 'h:' .. rid) == 1 then return {2, sm, hm, st, ht, ''} end
local lm, lt = tonumber(limit_m), tonumber(limit_t)
if lm >= 0 and (sm + hm >= lm or sm + hm + micros > lm) then return {0, sm, hm, st, ht, 'cost'} end
if lt >= 0 and (st + ht >= lt or st + ht + tokens > lt) then return {0, sm, hm, st, ht, 'tokens'} end
redis.call('HSET', state, 'limit_micros', limit_m, 'limit_tokens', limit_t, 'h:' .. rid, ARGV[2] .. ':' .. ARGV[3])
redis.call('HINCRBY', state, 'held_micros', micros)
redis.call('HINCRBY', state, 'held_tokens', tokens)
redis.call('ZADD', leases, now + tonumber(ARGV[6]), rid)
keep_expiry(tonumber(ARGV[7]))
return {1, sm, hm + micros, st, ht + tokens, ''}
"""
)

# ARGV: id, actual micros, actual tokens, ttl s. Returns {applied (0/1), had hold (0/1), spent micros, spent tokens}.
_SETTLE = (
    _PRELUDE
    + """
local rid = ARGV[1]
local micros, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HEXISTS', state, 'd:' .. rid) == 1 then
  local sm, hm, st, ht = totals()
  return {0, 0, sm, st}
end
local had = drop_hold(rid) and 1 or 0
local sm = redis.call('HINCRBY', state, 'spent_micros', micros)
local st = redis.call('HINCRBY', state, 'spent_tokens', tokens)
redis.call('HSET', state, 'd:' .. rid, ARGV[2] .. ':' .. ARGV[3])
keep_expiry(tonumber(ARGV[4]))
return {1, had, sm, st}
"""
)

# Releases expired holds and returns the totals (no other change).
_USAGE = (
    _PRELUDE
    + """
local sm, hm, st, ht = totals()
return {sm, hm, st, ht, redis.call('ZCARD', leases), tonumber(redis.call('HGET', state, 'expired_holds')) or 0}
"""
)


def to_micros(usd: float) -> int:
    """*usd* as whole micro-dollars, rounded half up (``0.0000015`` -> ``2``); ``ValueError`` for
    a negative, NaN or infinite amount."""
    if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not math.isfinite(usd) or usd < 0:
        raise ValueError(f"an amount in USD must be a finite number >= 0, got {usd!r}")
    # repr() is the shortest text that round-trips: 0.1 becomes exactly 100000 micro-dollars.
    return int((Decimal(repr(float(usd))) * MICROS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


class SharedBudgetError(StromaError):
    """The shared budget could not be consulted (Redis unreachable, a script error). The message
    names the budget key and the server (password masked)."""


class SharedBudgetExceeded(BudgetExceeded):
    """A :class:`SharedBudget` refused a reservation: what is spent and held by every process
    using the key, plus this request, would pass the limit.

    A :class:`~stroma.cost.BudgetExceeded` (so a run stops ``PARTIAL`` and the breach is in the
    step span's ``stroma.budget.exceeded`` event and the ``stroma.budget.breaches`` metric) with
    ``dimension`` ``"shared_cost"`` (USD) or ``"shared_tokens"``; ``actual`` is spent + held
    when it was refused, ``key`` the budget key and ``requested`` the amount asked for.
    """

    def __init__(
        self, dimension: Dimension, limit: float, actual: float, node_id: str, key: str, requested: float
    ) -> None:
        self.key = key
        self.requested = requested
        super().__init__(dimension, limit, actual, node_id)

    def _message(self) -> str:
        cost = self.dimension == "shared_cost"

        def fmt(value: float) -> str:
            return f"${value:.6g}" if cost else f"{value:,.0f} tokens"

        where = f" at step {self.node_id!r}" if self.node_id else ""
        return (
            f"shared budget {self.key!r} ({'USD' if cost else 'tokens'}) exhausted{where}: every process "
            f"using it has spent or holds {fmt(self.actual)} of a {fmt(self.limit)} limit, and "
            f"{fmt(self.requested)} more was requested. Raise the SharedBudget limit (in every process), "
            "or wait until running attempts settle or the key expires."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.dimension, self.limit, self.actual, self.node_id, self.key, self.requested),
        )


@dataclass(frozen=True)
class Reservation:
    """A granted hold: ``id``, the amounts held (``micros`` micro-dollars, ``tokens``) and
    ``retried`` (the id was already held or settled: this call changed nothing)."""

    id: str
    micros: int
    tokens: int
    retried: bool = False


@dataclass(frozen=True)
class SharedUsage:
    """The state of a shared budget, read after releasing expired holds (integers, exact)."""

    spent_micros: int
    held_micros: int
    spent_tokens: int
    held_tokens: int
    holds: int
    expired_holds: int

    @property
    def spent_usd(self) -> float:
        """``spent_micros`` in USD."""
        return self.spent_micros / MICROS_PER_USD


def _limit_micros(value: float | None) -> int:
    return -1 if value is None else to_micros(value)


class SharedBudget:
    """A USD and/or token limit shared by every process that names the same *key* (see the module docs).

    Args:
        key: what the budget is for, e.g. ``"acme:2026-12-01"`` (1-200 characters, no braces and
            no control characters).
        max_cost_usd: the limit in USD (rounded to whole micro-dollars), or ``None``.
        max_tokens: the limit in input + output tokens, or ``None``. At least one limit is needed.
        redis_url / client: where Redis is (exactly one; a client passed in is never closed).
        lease_seconds: how long a hold lives if it is not settled (> 0, default 300). Keep it above
            the longest attempt: a hold that lapses while its attempt still runs lets others spend it.
        ttl_seconds: lifetime of the key from its first reservation (whole seconds > 0, default
            2 days): the budget resets when it expires. Name a new key per period instead of relying
            on it alone.
        reserve_usd / reserve_tokens: the smallest amount held for each attempt run through the step
            loop (default 0). The estimate rule: an attempt of step *s* holds the larger of this and
            the largest actual cost (tokens) of an attempt of *s* seen so far by this object.
        key_prefix: prefix of the Redis keys (default ``"stroma:budget:"``).
        timeout_seconds: socket timeouts of a client created from *redis_url*.

    Raises :class:`~stroma.errors.ConfigurationError` for invalid settings (no connection is made
    at construction). Thread-safe; the ``*_attempt`` coroutines run the Redis call in a worker
    thread, so one object serves any number of event loops.
    """

    def __init__(
        self,
        key: str,
        *,
        max_cost_usd: float | None = None,
        max_tokens: int | None = None,
        redis_url: str | None = None,
        client: Any = None,
        lease_seconds: float = 300.0,
        ttl_seconds: int = 2 * 86400,
        reserve_usd: float = 0.0,
        reserve_tokens: int = 0,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_seconds: float = 5.0,
    ) -> None:
        if (
            not isinstance(key, str)
            or not 1 <= len(key) <= 200
            or any(ch in "{}" or ord(ch) < 32 or ord(ch) == 127 for ch in key)
        ):
            raise ConfigurationError(
                f"SharedBudget.key must be 1-200 characters without braces or control characters, got {key!r}"
            )
        if max_cost_usd is None and max_tokens is None:
            raise ConfigurationError(f"SharedBudget {key!r} needs max_cost_usd, max_tokens or both")
        try:
            self._limit_micros = _limit_micros(max_cost_usd)
        except ValueError:
            raise ConfigurationError(
                f"SharedBudget.max_cost_usd of {key!r} must be a finite number >= 0, got {max_cost_usd!r}"
            ) from None
        self._limit_tokens = -1 if max_tokens is None else _check_count(key, "max_tokens", max_tokens)
        if self._limit_micros > MAX_AMOUNT_MICROS:
            raise ConfigurationError(f"SharedBudget.max_cost_usd of {key!r} is too large to count exactly")
        if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float)) or not lease_seconds > 0:
            raise ConfigurationError(f"SharedBudget.lease_seconds must be a number > 0, got {lease_seconds!r}")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            raise ConfigurationError(f"SharedBudget.ttl_seconds must be whole seconds > 0, got {ttl_seconds!r}")
        if ttl_seconds < lease_seconds:
            raise ConfigurationError(
                f"SharedBudget.ttl_seconds ({ttl_seconds}) must be at least lease_seconds ({lease_seconds})"
            )
        try:
            self._reserve_micros = to_micros(reserve_usd)
        except ValueError:
            raise ConfigurationError(
                f"SharedBudget.reserve_usd must be a finite number >= 0, got {reserve_usd!r}"
            ) from None
        self._reserve_tokens = _check_count(key, "reserve_tokens", reserve_tokens)
        if not isinstance(key_prefix, str) or not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(
                f"SharedBudget.key_prefix must be a non-empty string without braces, got {key_prefix!r}"
            )
        if (redis_url is None) == (client is None):
            raise ConfigurationError(f"SharedBudget {key!r} needs exactly one of redis_url and client")
        if redis_url is not None and (
            not isinstance(redis_url, str) or urlsplit(redis_url).scheme not in ("redis", "rediss", "unix")
        ):
            raise ConfigurationError(
                f"SharedBudget.redis_url must be a redis://, rediss:// or unix:// URL, got {mask_url(str(redis_url))!r}"
            )
        self.key = key
        self.max_cost_usd = None if max_cost_usd is None else float(max_cost_usd)
        self.max_tokens = max_tokens
        self.lease_seconds = float(lease_seconds)
        self.ttl_seconds = ttl_seconds
        self._lease_ms = max(1, int(self.lease_seconds * 1000))
        self._keys = [f"{key_prefix}{{{key}}}", f"{key_prefix}{{{key}}}:leases"]
        self._target = mask_url(redis_url) if redis_url is not None else type(client).__name__
        # Retrying is safe: both scripts are idempotent by reservation id.
        self._redis = LazyRedis(redis_url, client, timeout_seconds=float(timeout_seconds), retries=2)
        # largest actual spend of one attempt per step id: (micros, tokens)
        self._largest: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return (
            f"SharedBudget({self.key!r}, max_cost_usd={self.max_cost_usd}, max_tokens={self.max_tokens}, "
            f"at {self._target!r})"
        )

    @property
    def redis_keys(self) -> tuple[str, str]:
        """The Redis keys of this budget: the hash of totals and holds, and the sorted set of leases."""
        return self._keys[0], self._keys[1]

    # --- Redis ----------------------------------------------------------------------------------

    def _call(self, name: str, source: str, args: list[Any], action: str) -> list[Any]:
        try:
            return list(self._redis.script(name, source)(keys=self._keys, args=args))
        except Exception as exc:
            if isinstance(exc, StromaError):
                raise
            raise SharedBudgetError(
                f"shared budget {self.key!r} at {self._target} could not {action} "
                f"({type(exc).__name__}); is Redis running and reachable there?"
            ) from exc

    # --- the budget -----------------------------------------------------------------------------

    def reserve(
        self, usd: float = 0.0, tokens: int = 0, *, reservation_id: str | None = None, step_id: str = ""
    ) -> Reservation:
        """Hold *usd* and *tokens* for ``lease_seconds``, atomically with the limit check.

        Granted while ``spent + held + request <= limit`` for every limit, and spent + held is
        below the limit (so a request of 0 is refused once the limit is reached). Calling again
        with the *reservation_id* of a hold or a settled reservation changes nothing and returns
        it with ``retried=True``. Raises :class:`SharedBudgetExceeded` (naming *step_id* when
        given) when refused, :class:`SharedBudgetError` when Redis cannot be reached, and
        :class:`~stroma.errors.ConfigurationError` when another process uses other limits for
        this key.
        """
        return self._reserve(to_micros(usd), _check_count(self.key, "tokens", tokens), reservation_id, step_id)

    def _reserve(self, micros: int, count: int, reservation_id: str | None, step_id: str) -> Reservation:
        rid = reservation_id if reservation_id is not None else os.urandom(12).hex()
        if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
            raise ConfigurationError(f"reservation_id must be a string of 1-128 characters, got {rid!r}")
        args = [rid, micros, count, self._limit_micros, self._limit_tokens, self._lease_ms, self.ttl_seconds]
        reply = self._call("reserve", _RESERVE, args, "reserve")
        status = int(reply[0])
        if status in (1, 2, 3):
            return Reservation(rid, micros, count, retried=status != 1)
        if status == -1:
            raise ConfigurationError(
                f"shared budget {self.key!r} is already used with other limits (micro-dollars/tokens, -1 = none: "
                f"{text(reply[5])}, here {self._limit_micros}/{self._limit_tokens}); every process naming a key "
                "must use the same max_cost_usd and max_tokens"
            )
        spent_m, held_m, spent_t, held_t = (int(v) for v in reply[1:5])
        if text(reply[5]) == "cost":
            raise SharedBudgetExceeded(
                "shared_cost",
                self._limit_micros / MICROS_PER_USD,
                (spent_m + held_m) / MICROS_PER_USD,
                step_id,
                self.key,
                micros / MICROS_PER_USD,
            )
        raise SharedBudgetExceeded(
            "shared_tokens", float(self._limit_tokens), float(spent_t + held_t), step_id, self.key, float(count)
        )

    def settle(self, reservation: Reservation | str, usd: float, tokens: int = 0) -> bool:
        """Replace the hold by the actual spend (*usd*, *tokens*); returns whether this call applied it.

        Idempotent by reservation id: settling an id again returns ``False`` and changes nothing.
        A reservation whose lease already expired still has its spend added. Raises
        :class:`SharedBudgetError` when Redis cannot be reached (retrying is safe).
        """
        return self._settle(reservation, to_micros(usd), _check_count(self.key, "tokens", tokens))

    def _settle(self, reservation: Reservation | str, micros: int, count: int) -> bool:
        rid = reservation.id if isinstance(reservation, Reservation) else reservation
        args = [rid, micros, count, self.ttl_seconds]
        reply = self._call("settle", _SETTLE, args, "settle")
        return bool(int(reply[0]))

    def release(self, reservation: Reservation | str) -> bool:
        """Give the hold back unspent (:meth:`settle` with nothing spent)."""
        return self.settle(reservation, 0.0, 0)

    def usage(self) -> SharedUsage:
        """Spent and held amounts (after releasing expired holds), exact integers."""
        reply = self._call("usage", _USAGE, [], "read its usage")
        return SharedUsage(*(int(v) for v in reply))

    def delete(self) -> None:
        """Remove the budget's keys (spend, holds and settled ids): the budget starts again at 0."""
        try:
            self._redis.client.delete(*self._keys)
        except Exception as exc:
            raise SharedBudgetError(
                f"shared budget {self.key!r} at {self._target} could not be deleted ({type(exc).__name__})"
            ) from exc

    def close(self) -> None:
        """Close the client this object created (a client passed in is left open). Idempotent."""
        self._redis.close()

    # --- the step loop's hook (stroma.cost.SharedLimit) ------------------------------------------

    def estimate(self, step_id: str) -> tuple[int, int]:
        """What the next attempt of *step_id* holds: ``(micro-dollars, tokens)`` (the estimate rule
        in the class docs)."""
        micros, tokens = self._largest.get(step_id, (0, 0))
        return max(micros, self._reserve_micros), max(tokens, self._reserve_tokens)

    async def reserve_attempt(self, step_id: str, run_id: str) -> Reservation:
        """Reserve the estimate for the next attempt of *step_id* (in a worker thread)."""
        micros, tokens = self.estimate(step_id)
        return await asyncio.to_thread(self._reserve, micros, tokens, None, step_id)

    async def settle_attempt(self, hold: Any, step_id: str, cost_usd: float, tokens: int) -> None:
        """Settle *hold* with the attempt's actual spend and learn the step's estimate. Never raises:
        a settle that fails is logged (error type only) and its hold lapses with its lease."""
        try:
            micros = min(to_micros(cost_usd), MAX_AMOUNT_MICROS)
        except ValueError:
            micros = 0
        if micros > 0 or tokens > 0:
            largest = self._largest.get(step_id)
            if largest is not None or len(self._largest) < _MAX_STEPS_REMEMBERED:
                old_m, old_t = largest or (0, 0)
                self._largest[step_id] = (max(old_m, micros), max(old_t, tokens))
        if not isinstance(hold, Reservation):
            return
        try:
            await asyncio.to_thread(self._settle, hold, micros, min(max(0, int(tokens)), MAX_AMOUNT_MICROS))
        except Exception as exc:
            logger.warning(
                "shared budget %s: settling an attempt of step %s failed (%s); its hold is released when its "
                "lease expires and this spend is not counted",
                self.key,
                step_id,
                type(exc).__name__,
            )


def _check_count(key: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT_MICROS:
        raise ConfigurationError(f"SharedBudget {key!r}: {name} must be a whole number >= 0, got {value!r}")
    return value
