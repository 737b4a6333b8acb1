"""``make bench``: the benchmark harness (``bench/run.py``) and its parts; ``floor.py`` and ``work.py``."""
