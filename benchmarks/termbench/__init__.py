"""The sections of ``benchmarks/compare_terms.py``, one module each (see that file)."""
