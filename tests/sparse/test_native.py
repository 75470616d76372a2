"""The C kernels of `mlsae.sparse.native` against torch references: `topk` against
`torch.topk` (ties, infinities, NaN rows, column slices, both of its paths),
`sparse_backward` against gradients summed in float64, both independent of the thread
count and tile size, and the same results from builds without AVX-512 or any vector
extensions."""

import os
import platform
import shutil

import pytest
import torch

from mlsae.sparse import native
from mlsae.sparse.backend import native_available
from mlsae.sparse.tuning import TUNING


@pytest.fixture(autouse=True)
def _kernels_compiled():
    # CI has a C compiler: the kernels must build there, never be skipped.
    if os.environ.get("MLSAE_NATIVE") == "0":
        pytest.skip("MLSAE_NATIVE=0 turns the kernels off")
    assert native.available(), "the C kernels did not compile (see the log)"


def _check_topk(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    expected = x.topk(k, dim=-1).values
    assert values.dtype == x.dtype and indices.dtype == torch.long
    torch.testing.assert_close(values.sort(-1, descending=True).values, expected, equal_nan=True)
    finite = ~values.isnan().any(-1)
    assert torch.equal(x.gather(1, indices)[finite], values[finite])
    assert all(row.unique().numel() == k for row in indices)


@pytest.mark.parametrize(
    ("n_rows", "n", "k"),
    [
        (64, 8192, 32),  # grouped threshold, few pass
        (64, 4096, 256),  # grouped threshold, a sixteenth pass
        (40, 1000, 7),  # grouped, n not a multiple of the groups
        (33, 100, 9),  # too short for groups: the first k, then the rest
        (5, 17, 17),  # k = n
        (3, 20, 1),
        (1, 70000, 64),
    ],
)
def test_topk_equals_torch_topk(n_rows, n, k):
    x = torch.randn(n_rows, n, generator=torch.Generator().manual_seed(n + k))
    _check_topk(x, k, *native.topk(x, k))


def test_topk_ties_infinities_and_nan_rows():
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (12, 4096), generator=generator).float()  # ties everywhere
    x[1] = 0.0
    x[2] = float("-inf")
    x[3, :10] = float("-inf")
    x[4, 500:600] = float("inf")
    x[5, 77] = float("nan")  # torch.topk ranks NaN first
    x[6, :] = float("nan")
    x[7] = torch.arange(4096.0)  # ascending: every element passes the running threshold
    x[8] = -torch.arange(4096.0)
    x[9, ::2] = -0.0
    for k in (1, 32, 300, 4096):
        _check_topk(x, k, *native.topk(x, k))


def test_topk_on_a_column_slice():
    x = torch.randn(20, 8192, generator=torch.Generator().manual_seed(1))
    view = x[:, 4096:]
    assert view.stride() == (8192, 1)
    _check_topk(view, 256, *native.topk(view, 256))


def test_topk_out_of_range_k_defers_to_torch():
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError):
        native.topk(x, 11)
    values, indices = native.topk(x, 0)
    assert values.shape == indices.shape == (3, 0)


def _problem(seed, n_vectors=70, width=13, k=4, n_latents=50, d=100, hot=False):
    generator = torch.Generator().manual_seed(seed)
    selected = torch.stack(
        [torch.randperm(n_latents, generator=generator)[:k] for _ in range(n_vectors)]
    )
    auxk = torch.stack(
        [torch.randperm(n_latents, generator=generator)[: width - k] for _ in range(n_vectors)]
    )
    if hot:  # a few latents in almost every vector: more entries than one chunk holds
        auxk = torch.arange(width - k).expand(n_vectors, -1)
    selected = torch.cat([selected, auxk], dim=1)  # a latent may be in both selections
    values = torch.randn(n_vectors, width, generator=generator).relu()  # a third are zero
    values[0, 0] = -1.0  # not positive: left out
    values[1, 1] = float("nan")  # left out too
    tensors = [torch.randn(*shape, generator=generator) for shape in [(n_vectors, d)] * 2]
    decoder = torch.randn(n_latents, d, generator=generator)
    x = torch.randn(n_vectors, d, generator=generator)
    direct = torch.randn(n_vectors, width, generator=generator)
    return selected, values, k, *tensors, decoder, x, direct


def _reference(selected, values, k, grad_main, grad_aux, decoder, x, direct):
    n_vectors, width = selected.shape
    keep = values > 0
    is_topk = (torch.arange(width) < k)[None, :, None]
    grad_rows = torch.where(is_topk, grad_main.double()[:, None], grad_aux.double()[:, None])
    rows = decoder.double()[selected]
    dvals = ((grad_rows * rows).sum(-1) + direct.double()) * keep
    flat = selected.reshape(-1)
    kept_values = torch.where(keep, values, 0).double().reshape(-1, 1)
    grad_dec = torch.zeros(decoder.shape, dtype=torch.float64)
    grad_dec.index_add_(0, flat, kept_values * grad_rows.reshape(-1, decoder.shape[1]))
    x_rows = x.double()[:, None].expand(-1, width, -1).reshape(-1, decoder.shape[1])
    grad_enc = torch.zeros(decoder.shape, dtype=torch.float64)
    grad_enc.index_add_(0, flat, dvals.reshape(-1, 1) * x_rows)
    sums = torch.zeros(decoder.shape[0], dtype=torch.float64).index_add_(0, flat, dvals.reshape(-1))
    return dvals, grad_dec, grad_enc, sums


@pytest.mark.parametrize("d", [100, 64, 37])
@pytest.mark.parametrize("hot", [False, True])
def test_sparse_backward_equals_a_float64_reference(d, hot):
    problem = _problem(d, d=d, hot=hot, n_vectors=300 if hot else 70)
    ours = native.sparse_backward(*problem, latent_sums=True)
    for got, expected in zip(ours, _reference(*problem), strict=True):
        assert got.dtype == torch.float32
        # fp32 sums of up to 300 terms of size ~10
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * scale)


def test_sparse_backward_without_auxk_encoder_or_direct_gradients():
    selected, values, k, grad_main, _, decoder, x, _ = _problem(3, width=4, k=4)
    dvals, grad_dec, grad_enc, sums = native.sparse_backward(
        selected, values, k, grad_main, None, decoder, None
    )
    assert grad_enc is None and sums is None
    ref = _reference(selected, values, k, grad_main, grad_main, decoder, x, torch.zeros(70, 4))
    torch.testing.assert_close(dvals.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_dec.double(), ref[1], rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_threads_or_tiles(monkeypatch):
    problem = _problem(5, n_vectors=400, n_latents=300, d=96)
    x = torch.randn(257, 5000)
    monkeypatch.setattr(TUNING, "min_parallel_terms", 0)
    results = []
    for threads, budget, visit in [(1, 1 << 30, 1), (2, 1 << 30, 1), (2, 4096, 1), (3, 1, 4)]:
        monkeypatch.setattr(TUNING, "l2_budget_bytes", budget)
        monkeypatch.setattr(TUNING, "min_entries_per_visit", visit)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append((native.sparse_backward(*problem, latent_sums=True), native.topk(x, 40)))
        finally:
            torch.set_num_threads(previous)
    for backward, topk in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(backward, results[0][0], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(topk, results[0][1], strict=True))


def test_sparse_backward_rejects_an_out_of_range_latent():
    selected, *rest = _problem(7)
    selected[3, 2] = 50
    with pytest.raises(IndexError, match="outside \\[0, n_latents\\)"):
        native.sparse_backward(selected, *rest)


def _cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return any(line.startswith("flags") and flag in line.split() for line in cpuinfo)


@pytest.mark.parametrize(
    "flags",
    [
        native.FLAGS + ("-mno-avx", "-mno-avx2", "-mno-avx512f"),
        native.FLAGS + ("-mavx", "-mno-avx2", "-mno-avx512f"),
        native.FLAGS + ("-mavx2", "-mfma", "-mno-avx512f"),
        pytest.param(
            native.FLAGS + ("-mavx512f", "-mavx2", "-mfma"),
            marks=pytest.mark.skipif(not _cpu_has("avx512f"), reason="the CPU lacks AVX-512"),
        ),
    ],
    ids=["no-vector-extensions", "avx", "avx2", "avx512"],
)
def test_builds_for_other_cpus_compute_the_same(tmp_path, monkeypatch, flags):
    """Each code path (scalar, AVX, AVX2, AVX-512) against this machine's own build."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    target = tmp_path / "native-test.so"
    assert native._compile(compiler, flags, target)
    other = native._load(target)
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(2))
    problem = _problem(11, d=100)
    expected_topk = native.topk(x, 256)
    expected_backward = native.sparse_backward(*problem, latent_sums=True)
    monkeypatch.setattr(native, "_library", lambda: other)
    values, indices = native.topk(x, 256)
    assert torch.equal(values.sort(-1).values, expected_topk[0].sort(-1).values)
    _check_topk(x, 256, values, indices)
    # Each build rounds its own way (with or without FMA, 16 lanes or fewer): both must
    # be as close to the float64 sums as fp32 allows, and close to each other.
    reference = _reference(*problem)
    got_backward = native.sparse_backward(*problem, latent_sums=True)
    for got, expected, exact in zip(got_backward, expected_backward, reference, strict=True):
        scale = exact.abs().max().item()
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 vector extensions")
def test_the_avx512_build_compiles_on_any_x86_cpu(tmp_path):
    """Where the CPU cannot run it, the AVX-512 path is at least compiled, warnings as errors."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    flags = native.FLAGS + ("-mavx512f", "-mavx2", "-mfma", "-Wall", "-Werror")
    assert native._compile(compiler, flags, tmp_path / "native-avx512.so")


def test_compiles_into_the_cache_directory_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.available() and native_available()
        assert len(list(tmp_path.glob("native-*.so"))) == 1
        monkeypatch.setenv("MLSAE_NATIVE", "0")
        assert not native_available()
    finally:
        native._library.cache_clear()
        monkeypatch.undo()
        assert native.available()


def test_the_kernels_take_float32_cpu_tensors_only():
    with pytest.raises(TypeError, match="native topk takes fp32 CPU tensors, not torch.bfloat16"):
        native.topk(torch.zeros(2, 8, dtype=torch.bfloat16), 2)
    selected, values, k, grad_main, grad_aux, decoder, x, direct = _problem(3)
    with pytest.raises(TypeError, match="native sparse_backward"):
        native.sparse_backward(selected, values.double(), k, grad_main, grad_aux, decoder, x)
