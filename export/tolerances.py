"""Default tolerances of export verification (no heavy imports: the CLI parser reads them)."""

DEFAULT_ATOL = 1e-5  # onnxruntime parity
DEFAULT_RTOL = 1e-5  # relative to the largest output magnitude
