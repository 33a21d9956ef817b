"""Redis Lua scripts built from steps, so that one move of a job (admission, its record, its limit leases, its
settlement, the event announcing it) is one atomic round trip rather than one per concern.

A step is the body of a Lua function of `(K, A)`, its own keys and arguments, kept beside the code it serves
(limits in service/limits.py, records in service/jobs.py...). It returns a table whose first element is 1 when
the chain may go on; anything else stops the chain there. A chain's script returns the replies of the steps
that ran, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis

StepCall = tuple[Sequence[str], Sequence[Any]]  # one step's keys and arguments

_DRIVER = """
local replies, ki, ai = {}, 1, 2 * #STEPS + 1
for i, step in ipairs(STEPS) do
  local K, A = {}, {}
  for j = 1, tonumber(ARGV[2 * i - 1]) do K[j] = KEYS[ki]; ki = ki + 1 end
  for j = 1, tonumber(ARGV[2 * i]) do A[j] = ARGV[ai]; ai = ai + 1 end
  local reply = step(K, A)
  replies[i] = reply
  if reply[1] ~= 1 then break end
end
return replies
"""


@dataclass(frozen=True)
class Step:
    name: str
    lua: str


class Chain:
    """Steps run in order inside one script: atomic, and one round trip."""

    def __init__(self, redis: ArqRedis, *steps: Step) -> None:
        functions = "\n".join(f"local function {s.name}(K, A)\n{s.lua.strip()}\nend" for s in steps)
        names = ", ".join(s.name for s in steps)
        self._script = redis.register_script(f"{functions}\nlocal STEPS = {{{names}}}\n{_DRIVER}")
        self._size = len(steps)

    async def __call__(self, *calls: StepCall) -> list[Any]:
        """One call per step; the replies of the steps that ran (fewer than the steps when one stopped)."""
        assert len(calls) == self._size, f"{len(calls)} calls for {self._size} steps"
        keys: list[str] = []
        counts: list[int] = []
        args: list[Any] = []
        for step_keys, step_args in calls:
            keys += step_keys
            args += step_args
            counts += [len(step_keys), len(step_args)]
        replies: list[Any] = await self._script(keys=keys, args=[*counts, *args])
        return replies
