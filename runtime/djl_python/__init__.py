"""Import-compatible subset of LMI's `djl_python` package, for custom handlers (model.py).

An LMI model.py that imports Input, Output, decode, create_non_stream_output or
handle_streaming_response from djl_python runs unchanged on lmi-runtime.
"""

from djl_python.inputs import Input
from djl_python.outputs import Output

__all__ = ["Input", "Output"]
