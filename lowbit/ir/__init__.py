"""lowbit's IR: captured fx graphs, typed annotations, the ``lowbit::`` ops and their schemas,
calibration statistics, quantization parameters, precision settings and artifacts.

Importing the package registers the ``lowbit::`` ops (``ops.py``), so that every schema's
``overload()`` resolves whichever module is imported first.
"""

from lowbit.ir import ops  # noqa: F401
