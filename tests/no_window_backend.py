"""A registered backend that predates sliding windows: the CPU kernels without ``SUPPORTS_WINDOW``.

Every built-in backend honours windows, so tests/test_errors.py registers this one to provoke the refusal a user's
own backend gets when it does not declare ``SUPPORTS_WINDOW = True``.
"""

from ringattn.kernels.cpu import backward, forward  # noqa: F401 - the kernel contract, minus the window flag

BACKWARD_TAKES_FP32_OUT = True
