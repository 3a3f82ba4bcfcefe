"""The compiled grouped GEMM computes exactly what the per-expert Python loop computes."""

from __future__ import annotations

import shutil
import sys
import warnings

import pytest
import torch

from moescope.moe import native
from moescope.moe.experts import build_experts
from moescope.moe.grouped import grouped_linear
from moescope.moe.layer import MoELayer

# empty experts, slices shorter than MIN_EXPERT_ROWS, slices the thread split cuts (one
# expert over an even share) and whole slices balanced over the threads (a trained router)
SIZES = [
    [279, 295, 255, 205, 215, 261, 278, 260],
    [0, 5, 300, 17, 0, 129, 1, 60],
    [512],
    [3, 3, 3],
    [200, 0, 0, 201],
    [16, 15, 16, 17, 40, 0, 90, 33],
]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _run(x, sizes, weights, biases, conv1d, g):
    xx = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    bs = [b.clone().requires_grad_() for b in biases] if biases else None
    out = grouped_linear(xx, sizes, ws, bs, conv1d=conv1d)
    out.backward(g)
    return out.detach(), xx.grad, [w.grad for w in ws], [b.grad for b in bs] if bs else []


def _case(sizes, conv1d, bias, d_in=24, d_out=40):
    torch.manual_seed(sum(sizes) + conv1d + 2 * bias)
    n = sum(sizes)
    shape = (d_in, d_out) if conv1d else (d_out, d_in)
    weights = [torch.randn(shape) for _ in sizes]
    biases = [torch.randn(d_out) for _ in sizes] if bias else None
    return torch.randn(n, d_in), weights, biases, torch.randn(n, d_out)


def test_the_kernels_build_on_this_machine():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja: moescope falls back to the Python loop")
    assert native.grouped_kernels() is not None


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("conv1d,bias", [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("sizes", SIZES)
def test_native_equals_python_loop_bit_for_bit(monkeypatch, threads, n_threads, conv1d, bias, sizes):
    if native.grouped_kernels() is None:
        pytest.skip("kernels unavailable")
    threads(n_threads)
    x, weights, biases, g = _case(sizes, conv1d, bias)
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    fast = _run(x, sizes, weights, biases, conv1d, g)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    loop = _run(x, sizes, weights, biases, conv1d, g)
    assert torch.equal(fast[0], loop[0])
    assert torch.equal(fast[1], loop[1])
    _assert_same_grads(fast, loop)


def _assert_same_grads(a, b):
    """Weight gradients bit for bit; bias gradients (a column sum, which torch may split
    over threads in another order) to float rounding."""
    for x, y in zip(a[2], b[2]):
        assert (x is None and y is None) or torch.equal(x, y)  # no rows: no gradient on either path
    for x, y in zip(a[3], b[3]):
        assert (x is None and y is None) or torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5) is None


@pytest.mark.parametrize("conv1d", [True, False])
def test_an_expert_over_an_even_share_runs_on_all_threads_and_still_equals_the_loop(monkeypatch, threads, conv1d):
    """A collapsed router at a real layer's size: 1500 of 2048 rows on one expert. Its weight
    gradient is one GEMM with all threads (where MKL really splits the work), the rest LPT."""
    if native.grouped_kernels() is None:
        pytest.skip("kernels unavailable")
    threads(2)
    sizes = [1500, 100, 0, 300, 148]
    x, weights, biases, g = _case(sizes, conv1d, True, d_in=128, d_out=512)
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    fast = _run(x, sizes, weights, biases, conv1d, g)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    loop = _run(x, sizes, weights, biases, conv1d, g)
    assert torch.equal(fast[0], loop[0]) and torch.equal(fast[1], loop[1])
    _assert_same_grads(fast, loop)


def test_results_do_not_depend_on_the_thread_count(threads):
    """The work split moves with the thread count; no row's arithmetic may move with it."""
    if native.grouped_kernels() is None:
        pytest.skip("kernels unavailable")
    sizes = [0, 5, 300, 17, 0, 129, 1, 60]
    x, weights, biases, g = _case(sizes, True, True)
    threads(1)
    one = _run(x, sizes, weights, biases, True, g)
    threads(2)
    two = _run(x, sizes, weights, biases, True, g)
    assert torch.equal(one[0], two[0])
    assert torch.equal(one[1], two[1])
    _assert_same_grads(one, two)


def test_switch_off_and_failed_build_fall_back_to_the_loop(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.grouped_kernels() is None
    monkeypatch.setenv(native.ENV_SWITCH, "1")

    def no_compiler(**kwargs):
        raise OSError("no compiler here")

    native._build.cache_clear()
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    try:
        with pytest.warns(RuntimeWarning, match="grouped_gemm.cpp.*no compiler here"):
            assert native.grouped_kernels() is None
        layer = MoELayer(build_experts(4, 16, 32), 16)
        assert layer(torch.randn(10, 16)).shape == (10, 16)  # still runs, on the loop
    finally:
        native._build.cache_clear()


def test_autocast_takes_the_loop_and_runs(monkeypatch):
    """Worker threads do not inherit autocast: the kernels must not see autocast inputs."""
    torch.manual_seed(0)
    layer = MoELayer(build_experts(4, 16, 32), 16)
    x = torch.randn(40, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = layer(x)
    assert torch.equal(out, ref)


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path):
    (tmp_path / "lock").touch()  # what torch leaves behind when its build is SIGKILLed
    with native._exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_an_unusable_cache_root_falls_back_to_a_private_temporary_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "cache"))  # mkdir fails under a file
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tag = f"moescope-torch9.9.9_cpu-py{sys.version_info.major}{sys.version_info.minor}"
    path = native._build_directory("9.9.9+cpu")
    assert path.parent.parent == tmp_path / "tmp" and path.name == tag and path.is_dir()
    assert path.parent.stat().st_mode & 0o777 == 0o700

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "readonly"))
    monkeypatch.setattr("os.access", lambda p, mode: not str(p).startswith(str(tmp_path / "readonly")))
    assert native._build_directory("9.9.9+cpu") == path  # exists but not writable: same fallback


def test_inference_mode_runs_the_kernels_on_every_thread(threads):
    """Worker threads take the caller's thread-local state; writing an inference tensor
    from a thread outside inference mode would be refused."""
    threads(2)
    torch.manual_seed(0)
    layer = MoELayer(build_experts(4, 64, 128), 64).eval()
    x = torch.randn(512, 64)
    with torch.no_grad():
        ref = layer(x)
    with torch.inference_mode():
        out = layer(x)
    assert torch.equal(out, ref)


def test_double_backward_is_refused_not_silently_zero():
    torch.manual_seed(0)
    x = torch.randn(40, 8, requires_grad=True)
    weights = [torch.randn(8, 8, requires_grad=True) for _ in range(2)]
    out = grouped_linear(x, [20, 20], weights, None, conv1d=True)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    assert gx.requires_grad  # not a silently constant gradient ...
    with pytest.raises(RuntimeError, match="differentiate twice"):  # ... but a clear refusal
        gx.sum().backward()
