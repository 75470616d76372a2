"""C kernels for the autoencoder's sparse steps on the CPU, compiled on first use.

- `topk`: the k largest elements of every row, as `torch.topk(sorted=False)`, in one
  vectorised pass: a threshold from the maxima of groups of elements, a compare of 16
  elements at a time against it, and a compress-store of the few that pass, where the
  torch ops make several passes over the row.
- `sparse_backward`: the fused autoencoder's whole backward over its selected entries
  (the values', the decoder's and the encoder's gradients) in one pass per tile of
  vectors, with its own counting sort by latent, where torch's path makes a pass per
  product plus a sort and gathers.

The kernels run on torch's own OpenMP threads (`GOMP_parallel` of the runtime torch
loaded): threads of their own would compete for the cores with OpenMP's, which spin for a
while after every torch operation.

The source is compiled with the system's C compiler (`$CC`, else `cc`) for this CPU
(`-march=native`) into `$MLSAE_CACHE_DIR` (default `~/.cache/mlsae`), keyed by a hash of
the source, the compiler, its flags and the CPU, so a shared home directory serves
different machines. Without a compiler `available()` is False; `mlsae.sparse.backend`
decides whether they run (the `native` backend, fp32 CPU tensors only, unless
`MLSAE_NATIVE=0`), and the other backends compute the same results to float rounding.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlsae.sparse.tuning import TUNING

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=fast", "-Wno-psabi")
TUNE_FLAGS = ("-march=native",)

_ERRORS = {
    1: (IndexError, "a selected latent index is outside [0, n_latents)"),
    2: (MemoryError, "out of memory for its scratch buffers"),
    3: (ValueError, "k must be in [1, n], and n below 2**31"),
}


def available() -> bool:
    """Whether the kernels are compiled and loaded (compiling them on the first call)."""
    return _library() is not None


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    configured = os.environ.get("MLSAE_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mlsae"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [
                line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))
            ]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *flags, str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            logger.info("compiling %s failed: %s", SOURCE.name, result.stderr.strip()[-2000:])
            return False
        os.replace(built, target)  # atomic: concurrent processes may compile the same file
    return True


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.mlsae_topk.argtypes = [ctypes.c_int, *[i64] * 4, *[ptr] * 4]
    library.mlsae_sparse_backward.argtypes = [*[ctypes.c_int] * 2, *[i64] * 7, *[ptr] * 11]
    for function in (library.mlsae_topk, library.mlsae_sparse_backward):
        function.restype = ctypes.c_int
    library.mlsae_use_openmp.argtypes = [ptr]
    library.mlsae_use_openmp.restype = None
    parallel = _openmp_parallel()
    if parallel is not None:
        library.mlsae_use_openmp(parallel)
    return library


def _openmp_parallel() -> int | None:
    """The address of `GOMP_parallel` in the OpenMP runtime torch loaded, if any: the
    kernels run their threads as one of its parallel regions, on torch's own threads."""
    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if Path(path).name.startswith(("libgomp", "libiomp", "libomp")):
                    candidates.append(path)
    except OSError:
        candidates = [str(p) for p in (Path(torch.__file__).parent / "lib").glob("lib*omp*")]
    for path in dict.fromkeys(candidates):
        try:
            return ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: the CPU kernels of mlsae.sparse.native are off")
        return None
    for flags in (FLAGS + TUNE_FLAGS, FLAGS):
        key = hashlib.sha256()
        for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode()):
            key.update(part)
        key.update((platform.machine() + _cpu_identity()).encode())
        target = cache_dir() / f"native-{key.hexdigest()[:16]}.so"
        try:
            if target.exists() or _compile(compiler, flags, target):
                return _load(target)
        except OSError as error:
            logger.info("loading the CPU kernels from %s failed: %s", target, error)
    logger.info("the CPU kernels of mlsae.sparse.native are off (see the messages above)")
    return None


def _pointer(tensor: Tensor | None) -> ctypes.c_void_p | None:
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def _threads(n_terms: int) -> int:
    return 1 if n_terms < TUNING.min_parallel_terms else torch.get_num_threads()


def _check(status: int, kernel: str) -> None:
    if status:
        error, message = _ERRORS.get(status, (RuntimeError, f"failed with status {status}"))
        raise error(f"native {kernel}: {message}")


def _require_fp32_cpu(kernel: str, *tensors: Tensor | None) -> None:
    for tensor in tensors:
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.device.type != "cpu"):
            raise TypeError(
                f"native {kernel} takes fp32 CPU tensors, not {tensor.dtype} on {tensor.device}"
            )


def _rows(tensor: Tensor) -> Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def topk(x: Float[Tensor, "rows n"], k: int) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=-1, sorted=False)` for an fp32 CPU matrix with unit column stride
    (a column slice is fine): the same values per row, in an unspecified order, and among
    elements tied at the k-th value, any of them. Rows holding a NaN go to `torch.topk`."""
    _require_fp32_cpu("topk", x)
    n_rows, n = x.shape
    if not 0 < k <= n:
        return x.topk(k, dim=-1, sorted=False)
    x = _rows(x)
    values = x.new_empty((n_rows, k))
    indices = torch.empty((n_rows, k), dtype=torch.long)
    nan_rows = torch.empty(n_rows, dtype=torch.uint8)
    status = _library().mlsae_topk(
        _threads(n_rows * n * 16),
        n_rows,
        n,
        k,
        x.stride(0),
        _pointer(x),
        _pointer(values),
        _pointer(indices),
        _pointer(nan_rows),
    )
    _check(status, "topk")
    if nan_rows.any():
        rows = nan_rows.nonzero().squeeze(1)
        values[rows], indices[rows] = x[rows].topk(k, dim=-1, sorted=False)
    return values, indices


def sparse_backward(
    selected: Int[Tensor, "vectors width"],
    values: Float[Tensor, "vectors width"],
    k: int,
    grad_main: Float[Tensor, "vectors d"],
    grad_aux: Float[Tensor, "vectors d"] | None,
    decoder: Float[Tensor, "n_latents d"],
    x: Float[Tensor, "vectors d"] | None,
    direct: Float[Tensor, "vectors width"] | None = None,
    latent_sums: bool = False,
    skip_nonpositive: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The fused autoencoder's backward over its selected entries (see `native.c`).

    Entry `(v, i)` has latent `selected[v, i]` and value `values[v, i]`; slots `i < k`
    were decoded with gradient `grad_main[v]`, the rest with `grad_aux[v]`. With
    `skip_nonpositive` (values after ReLU), entries whose value is not positive are
    skipped; without it every entry counts (a plain decode's backward). Returns `(dvals,
    grad_decoder, grad_encoder, sums)`: each entry's gradient `dot(grad row,
    decoder[latent]) + direct[v, i]` (zero where skipped), the latent-major decoder
    gradient `sum of value * grad row` per latent, the encoder gradient `sum of dvals *
    x[v]` per latent (None without `x`) and, with `latent_sums`, each latent's sum of
    dvals."""
    _require_fp32_cpu("sparse_backward", values, grad_main, grad_aux, decoder, x, direct)
    n_vectors, width = selected.shape
    n_latents, d = decoder.shape
    decoder = _rows(decoder)
    selected, values = selected.long().contiguous(), values.contiguous()
    grad_main = grad_main.contiguous()
    grad_aux = None if grad_aux is None or width == k else grad_aux.contiguous()
    x = None if x is None else x.contiguous()
    direct = None if direct is None else direct.contiguous()
    dvals = values.new_empty((n_vectors, width))
    grad_decoder = decoder.new_empty((n_latents, d))
    grad_encoder = None if x is None else decoder.new_empty((n_latents, d))
    sums = decoder.new_empty(n_latents) if latent_sums else None
    rows_per_vector = (1 if grad_aux is None else 2) + (0 if x is None else 1)
    tile = max(
        16,
        TUNING.l2_budget_bytes // (rows_per_vector * max(d, 1) * 4),
        -(-TUNING.min_entries_per_visit * n_vectors * n_latents // max(1, selected.numel())),
    )
    tile = min(tile, (2**31 - 1) // max(width, 1))  # entries of a tile are int32 positions
    status = _library().mlsae_sparse_backward(
        _threads(selected.numel() * d * 3),
        int(skip_nonpositive),
        n_vectors,
        width,
        k,
        n_latents,
        d,
        decoder.stride(0),
        tile,
        _pointer(selected),
        _pointer(values),
        _pointer(direct),
        _pointer(grad_main),
        _pointer(grad_aux),
        _pointer(decoder),
        _pointer(x),
        _pointer(dvals),
        _pointer(grad_decoder),
        _pointer(grad_encoder),
        _pointer(sums),
    )
    _check(status, "sparse_backward")
    return dvals, grad_decoder, grad_encoder, sums
