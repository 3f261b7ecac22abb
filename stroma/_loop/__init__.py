"""The reliability loop's private parts; :mod:`stroma.middleware` is its public home.

- :mod:`stroma._loop.run`: the loop: admit an attempt, run it, decide (retry after a delay,
  or stop with a status);
- :mod:`stroma._loop.state`: the state of one step call and the deferred trace event of an attempt;
- :mod:`stroma._loop.step_io`: calling the user's step and reading its usage and return value;
- :mod:`stroma._loop.admission`: the gate that admits concurrent attempts under a shared budget.

What the loop writes on spans and metrics lives beside it, in :mod:`stroma.telemetry.steps`.
"""
