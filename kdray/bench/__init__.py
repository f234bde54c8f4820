"""``kdray bench``: kdray's performance claims, measured. One JSON line per measurement on stdout.

- ``step``: images/s of kdray's KD training step against a hand-written PyTorch loop doing the same
  math (``kdray.bench.loop``), alternated in one process; the ratio is kdray's overhead.
- ``cache``: one KD epoch with the guide-output cache off, cold and warm, beside the student trained
  alone (the floor: what KD costs when the teacher costs nothing).
- ``search``: a small search with the model store and the cache on, then off (every trial trains its
  own teacher and runs it every step): wall time and teacher forward passes.
- ``trials``: the fixed cost of one search trial, in-process and as a 1-worker Ray Train run.
- ``data``: decode + augment images/s per core of the streaming path against a plain ``DataLoader``
  (``kdray.bench.data``), and with ``--data-root`` an epoch in memory vs streamed.

Models for ``step`` and ``cache`` have random weights on random images: speed does not depend on
either. Searches use kdray's defaults (digits) unless overridden with ``-o key=value``.
"""
