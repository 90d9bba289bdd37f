"""The process a user reward function runs in (see rewards.py): JSON lines in, JSON lines out.

Started as ``python -m stalwart.trainer.rl.reward_worker package.module:function``. It first
answers ``{"ready": true}`` (or ``{"error": ...}`` when the function cannot be imported), then
for each request line ``{"prompt", "completion", "answer"}`` answers ``{"reward": value}`` or
``{"error": "ExceptionType: message"}``. The parent enforces the deadline by killing it.
"""

from __future__ import annotations

import importlib
import json
import sys


def _load(dotted: str):
    from stalwart.trainer.rl.rewards import split_dotted_path

    module_name, function_name = split_dotted_path(dotted)
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise AttributeError(f"{module_name} has no callable {function_name!r}")
    return function


def main(argv: list[str]) -> int:
    out = sys.stdout
    # A function that prints must not corrupt the protocol: its prints go to stderr.
    sys.stdout = sys.stderr
    try:
        function = _load(argv[0])
    except Exception as error:  # reported to the parent, which raises a ValueError
        out.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            value = function(request["prompt"], request["completion"], request["answer"])
            reply = {"reward": value if isinstance(value, int | float) else repr(value)}
        except Exception as error:
            reply = {"error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
