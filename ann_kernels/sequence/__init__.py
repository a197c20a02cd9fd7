"""EANN: exponentially deepening sequences of anytime networks (DESIGN.md, "EANN").

- :class:`EANN`: M multi-exit members run in order, each restarting from the input; its
  exits are the members' used exits in order of cumulative cost; ``anytime_predict`` returns
  the latest exit finished within a FLOP budget or before a wall-clock deadline.
- :func:`eann`: scale a model builder so that measured member costs grow by ``growth``.
- :class:`EANNEngine`: budgeted per-sample early exit over the sequence, calibrated with the
  single-network calibration code.
- :mod:`.training` (train every member with ``AnytimeLoss``, one checkpoint each),
  :mod:`.evaluation` (anytime curves, best-single-member envelope, cost inflation, plots)
  and :mod:`.commands` (``ann-kernels eann train`` / ``eval``) import lazily.

(The package is not called ``ann_kernels.eann`` because ``ann_kernels.eann`` is the builder
function; a module of the same name would be shadowed by it.)
"""

from ann_kernels.sequence.builder import eann
from ann_kernels.sequence.engine import EANNEngine
from ann_kernels.sequence.model import EANN, AnytimeResult, BuildInfo

__all__ = ["EANN", "AnytimeResult", "BuildInfo", "EANNEngine", "eann"]
