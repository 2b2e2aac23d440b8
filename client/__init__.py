"""modelconsole.client: one handle per model, the same call in process or over the wire.

    from modelconsole.client import Model

    m = Model("tiny-mlp", url="http://127.0.0.1:8000")   # KServe V2, binary tensors; no torch needed
    out = m.predict({"input": x})                          # numpy in (torch tensors too), numpy out
    m2 = Model.from_ref(m.to_ref())                        # a small JSON reference, never the weights

See ``model.py``.
"""

from .model import Model

__all__ = ["Model"]
