"""Named datasets without a network: the bundled MNIST subset is real MNIST, and a dataset that is
neither on disk nor downloadable fails in one line. (The offline fallback of --data mnist and the
IDX files read in place are in test_plumbing.py.)"""
import numpy as np

from common import error_of, load_script


def test_mnist_mini_is_real_mnist_in_real_proportions():
    module = load_script("vanilla_gan.py")
    images, labels, classes = module.load_named(module.parse_args(["--data", "mnist-mini"]))
    assert images.shape == (10000, 1, 28, 28) and images.dtype == module.torch.uint8
    assert labels.shape == (10000,) and classes == [str(c) for c in range(10)]
    share = np.bincount(labels.numpy(), minlength=10) / len(labels)
    assert share.min() >= 0.08 and share.max() <= 0.12, share
    assert images.float().mean() > 20 and (images == 0).float().mean() > 0.5  # digits, not noise


def test_other_datasets_without_network_fail_clearly(tmp_path, monkeypatch):
    module = load_script("dcgan.py")

    def offline(*args, **kw):
        raise OSError("no network")

    monkeypatch.setattr(module.torchvision.datasets, "FashionMNIST", offline)
    msg = error_of("dcgan.py", "--data", "fashion-mnist", "--data-root", tmp_path, "--steps", 1)
    assert "could not be downloaded (OSError: no network)" in msg
