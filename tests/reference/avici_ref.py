"""Import the reference `avici` 1.0.7 package and Haiku from the repository's `.ref/`.

Install (not into the venv's site-packages):

    pip install --no-deps --target .ref avici==1.0.7 dm-haiku==0.0.17 jmp==0.0.4 tabulate

avici 1.0.7 does not import on current JAX and numpy as published: it imports
`jax.sharding.PositionalSharding` (removed from JAX) and `pyarrow.plasma` (removed in
pyarrow 12), and at import time pulls in heavy optional modules (pandas, igraph,
tensorflow, huggingface_hub, ...) that its model code never uses. `import_avici`
injects stand-ins for exactly those before importing; the network code
(`avici.model`, Haiku) runs unmodified.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

REF_DIR = Path(os.environ.get("CAASL_AVICI_REF", Path(__file__).resolve().parents[2] / ".ref"))

# modules avici imports at package import time but never uses in the model code
_OPTIONAL = ("pyarrow", "pyarrow.plasma", "huggingface_hub", "igraph", "deepdiff", "pandas",
             "psutil", "tensorflow", "tensorflow_datasets")


class _StubModule(types.ModuleType):
    """A module whose every public attribute is a fresh placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def reference_available() -> tuple[bool, str]:
    """(True, "") if .ref holds avici and haiku; else (False, reason)."""
    for name in ("avici", "haiku"):
        if not (REF_DIR / name / "__init__.py").is_file():
            return False, (
                f"reference install missing ({REF_DIR / name}); run: pip install --no-deps "
                f"--target {REF_DIR} avici==1.0.7 dm-haiku==0.0.17 jmp==0.0.4 tabulate"
            )
    return True, ""


def import_avici():
    """Return (avici.model module, haiku module); raises ImportError if unavailable."""
    ok, reason = reference_available()
    if not ok:
        raise ImportError(reason)
    if str(REF_DIR) not in sys.path:
        sys.path.append(str(REF_DIR))
    import jax.sharding

    if not hasattr(jax.sharding, "PositionalSharding"):
        jax.sharding.PositionalSharding = type("PositionalSharding", (), {})
    stubbed = []
    for name in _OPTIONAL:
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = _StubModule(name)
            stubbed.append(name)
    try:
        import avici.backbone  # noqa: F401  (imports deepdiff lazily; load it under the stubs)
        import avici.model
        import haiku
    finally:
        # a stand-in `tensorflow` left in sys.modules makes orbax/etils believe
        # TensorFlow is installed later in the same process; avici no longer needs it
        for name in stubbed:
            if name.startswith("tensorflow"):
                sys.modules.pop(name, None)

    return avici.model, haiku
