"""What the tests and the benchmarks both stand on, importable by either and importing neither.

``fake_studio`` (a Label Studio stand-in over real HTTP), ``servers`` (uvicorn servers and
test settings), ``tiny_models`` (small seeded DETR-family and ViT checkpoints), ``scenes``
(the learning benchmark's synthetic large images, their Label Studio export and the
source-domain base), ``sahi_reference`` (sahi run the way the parity tests compare
against), ``pytest_plugin`` (fixtures both test suites use).
"""

from pathlib import Path

# The committed checkpoints, seeded and rebuilt by ``python -m testkit.tiny_models``: test
# data, so they live under tests/; the benchmarks read the same files.
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models"
