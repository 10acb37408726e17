"""One trial protocol: the common parts of a trial and one module per trial kind.

Modules (the first four import no training stack: the driver and the pre-flight read them):

* :mod:`~search.trials.metrics`: the metric names, declared once.
* :mod:`~search.trials.kinds`: the trial kinds (what each applies to, reports, and which function
  runs it), read by the pre-flight and by the worker alike.
* :mod:`~search.trials.context`: :class:`~search.trials.context.TrialContext` (what the driver
  hands each trial) and the Tune trainable.
* :mod:`~search.trials.text_config`: recognising and checking Hugging Face text configs.
* :mod:`~search.trials.common`: errors, the method build, device, latency, the output folder and
  the result record.
* :mod:`~search.trials.run`: :func:`~search.trials.run.run_trial` (choose the kind, hand over)
  and :func:`~search.trials.run.run_tune_trial`.
* one module per kind: :mod:`~search.trials.training` (``train``), :mod:`~search.trials.ken`
  (``ken_pair``), :mod:`~search.trials.text` (``text``, ``text_ken_pair``).
* :mod:`~search.trials.mlflow_run` (a trial's live MLflow run) and :mod:`~search.trials.progress`
  (its progress records).
* :mod:`~search.trials.preload`: what a training trial imports, imported ahead by the workers of
  a local Ray as they start (never by the driver).

This package's ``__init__`` imports nothing, so importing a light module of it never loads the
heavy ones.
"""
