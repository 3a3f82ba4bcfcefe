"""The allocator setting the CLI applies: a training-like loop stops re-faulting its freed memory."""

import subprocess
import sys

import pytest

from moescope.runtime import keep_freed_memory

# Forward + backward through a [2048 x 4096] log-softmax (the demo's LM head): tens of MB
# of temporaries allocated and freed per iteration. Prints the page faults of 10 iterations.
LOOP = """
import resource, sys, torch
from moescope.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
w = torch.randn(128, 4096, requires_grad=True)
h = torch.randn(2048, 128)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    (h @ w).log_softmax(-1).sum().backward()
before = faults()
for _ in range(10):
    (h @ w).log_softmax(-1).sum().backward()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_training_loop_reuses_freed_memory_instead_of_faulting_it_back():
    if not keep_freed_memory():
        pytest.skip("no glibc mallopt on this platform")
    default, kept = _faults("default"), _faults("keep")
    assert kept < 0.3 * default, (kept, default)  # measured: ~49k vs ~330k page faults
