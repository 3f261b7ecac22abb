"""A process that spends against a shared budget; run by the fleet tests as a subprocess.

    python fleet_spender.py spend URL KEY LIMIT_USD   # after "ready" and a line on stdin: reserve
                                                      # $0.001, spend $0.0005-$0.0015, until refused
    python fleet_spender.py hold URL KEY LIMIT_USD LEASE_S USD   # hold USD, say "held", wait to be killed
    python fleet_spender.py exhaust URL KEY LIMIT_USD   # spend the whole limit at once

Prints one JSON line with what it settled (integer micro-dollars), for the test to add up.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from stroma.fleet import SharedBudget, SharedBudgetExceeded, to_micros

RESERVE_USD = 0.001
GIVE_UP_AFTER = 40  # consecutive refusals: the budget is spent


def main() -> None:
    mode, url, key, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    lease = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    budget = SharedBudget(key, max_cost_usd=limit, redis_url=url, lease_seconds=lease)
    if mode == "hold":
        budget.reserve(float(sys.argv[6]))
        print("held", flush=True)
        time.sleep(120)
        return
    if mode == "exhaust":
        hold = budget.reserve(limit)
        budget.settle(hold, limit)
        print(json.dumps({"settled_micros": to_micros(limit), "attempts": 1}), flush=True)
        return
    budget.usage()  # connected and scripts loaded before the start signal
    print("ready", flush=True)
    sys.stdin.readline()  # all processes start spending together
    rng = random.Random(os.getpid())
    settled = attempts = refusals = 0
    while refusals < GIVE_UP_AFTER:
        try:
            hold = budget.reserve(RESERVE_USD)
        except SharedBudgetExceeded:
            refusals += 1
            time.sleep(0.005)
            continue
        refusals = 0
        time.sleep(rng.uniform(0, 0.003))  # the attempt runs
        actual = rng.randint(500, 1500) / 1_000_000
        assert budget.settle(hold, actual)
        settled += to_micros(actual)
        attempts += 1
    print(json.dumps({"settled_micros": settled, "attempts": attempts}), flush=True)


if __name__ == "__main__":
    main()
