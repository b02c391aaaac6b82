"""Automatic split selection on the trainer.

The trainer uses one thing from here: :class:`AutomaticSplit`, built for a
run by ``AutomaticSplit.measured(model, config, plan, conn, log)``, with
``split``, ``observe(shard)``, ``wants_step_times``/``observe_step(seconds)``,
``observe_iteration(parts, seconds)``, ``report()`` and ``plot(path)``; it
raises :class:`SplitSelectionError` when no split fits. The modules behind
it, one job each:

- ``profiling``: the measurements (:class:`Profile`) and how the trainer
  takes them before training;
- ``profilecache``: the trainer's own measurements kept on local disk between runs;
- ``storagecosts``: the storage tier's layer costs (``/hapi/costs``), asked
  before the first request;
- ``estimator``: the running estimates of the storage tier's speed, the
  trainer's and the bandwidth, from the stream and the iterations, and
  their drift;
- ``costmodel``: the predicted time of every split and the choice
  (:class:`Decision`);
- ``selector``: :class:`AutomaticSplit`, which decides and re-decides over a run;
- ``plot``: the decision as a picture (matplotlib is imported only there,
  when a plot is drawn).
"""

from hapi.client.autosplit.costmodel import Decision
from hapi.client.autosplit.profiling import Profile
from hapi.client.autosplit.selector import AutomaticSplit, SplitSelectionError

__all__ = ["AutomaticSplit", "Decision", "Profile", "SplitSelectionError"]
