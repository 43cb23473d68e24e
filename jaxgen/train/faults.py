"""Faults injected on purpose, for `experiments/faults.py` and the tests that check recovery.

The environment variable JAXGEN_FAULT names faults as `<action>@<point>:<step>`, comma-separated:

    kill@save:6     SIGKILL this process while the checkpoint of step 6 is being written
    kill@eval:3     SIGKILL it in the middle of the evaluation at step 3
    kill@step:4     SIGKILL it right after the update of step 4
    term@step:4     SIGTERM it after step 4 (a preemption notice)
    raise@data:5    the data pipeline raises while fetching the batch of step 5
    nan@loss:5      the loss of step 5 is NaN (a float input of its batch is poisoned)

Unset (every real run), `at` and `poison` cost a dictionary lookup.
"""

from __future__ import annotations

import functools
import os
import signal
from typing import Any

import numpy as np

ENV = "JAXGEN_FAULT"
ACTIONS = ("kill", "term", "raise", "nan")
POINTS = ("save", "eval", "step", "data", "loss")


class InjectedFault(RuntimeError):
    """The exception a `raise@<point>` fault raises."""


@functools.cache
def _parse(spec: str) -> dict[tuple[str, int], str]:
    """{(point, step): action} of a JAXGEN_FAULT value."""
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, _, where = item.partition("@")
        point, _, step = where.partition(":")
        if action not in ACTIONS or point not in POINTS or not step.isdigit():
            raise ValueError(
                f"{ENV}={spec!r}: {item!r} is not <action>@<point>:<step> with an action of "
                f"{', '.join(ACTIONS)} and a point of {', '.join(POINTS)}"
            )
        faults[(point, int(step))] = action
    return faults


def _action(point: str, step: int) -> str | None:
    spec = os.environ.get(ENV)
    return _parse(spec).get((point, step)) if spec else None


def at(point: str, step: int) -> None:
    """Carries out the fault JAXGEN_FAULT names for this point and step, if any."""
    action = _action(point, step)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "raise":
        raise InjectedFault(f"injected fault: the {point} pipeline failed at step {step}")


def poison(batch: dict[str, Any], step: int) -> dict[str, Any]:
    """The batch with a NaN in its first float array when JAXGEN_FAULT asks for a NaN loss at
    this step (the weights of the scored positions: the loss becomes NaN); else the batch."""
    if _action("loss", step) != "nan":
        return batch
    for key, value in batch.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            poisoned = np.array(value, copy=True)
            poisoned.flat[0] = np.nan
            return {**batch, key: poisoned}
    raise ValueError(f"{ENV}: nan@loss needs a float array in the batch; it has {sorted(batch)}")
