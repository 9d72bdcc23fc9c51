"""Test set-up: Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so before diffattn's
kernels are imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core: more than one torch thread per worker oversubscribes the
# cores and makes the many tiny ops of these tests slower, not faster.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the kernel under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _remove_diffattn_from_model(request):
    """A test module's ``model`` fixture (a transformer shared by its tests) leaves every test
    without diffattn installed, whatever the test did."""
    # Requested before the test (not after): torn down before the model fixture, even a parametrized one.
    model = request.getfixturevalue("model") if "model" in request.fixturenames else None
    yield
    if model is not None:
        if isinstance(model, torch.nn.Module) and getattr(model, "_diffusers_hook", None) is not None:
            import diffattn
            from diffattn.integration.apply import _installed_hook

            if _installed_hook(model) is not None:
                diffattn.remove(model)
