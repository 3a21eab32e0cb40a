"""A small fixed feature extractor for the evaluation tests, registered with torch-fidelity as
"test-extractor": a seeded random convolution, pooled, 16 features. No network, no weights file.
Imported by the tests in their own process, and by sitecustomize.py (beside this file) in the
scripts' processes when PYTHONPATH names this folder. SEEN records what it was given."""
import torch
import torch.nn as nn
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

NAME = "test-extractor"
SEEN = []                                   # (dtype, shape) of each batch it was given


class RandomConvFeatures(FeatureExtractorBase):
    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) / 5)
            self.conv.bias.zero_()

    @staticmethod
    def get_provided_features_list():
        return ("16",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "16"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        SEEN.append((x.dtype, tuple(x.shape)))
        assert x.dtype == torch.uint8 and x.shape[1] == 3, (x.dtype, x.shape)
        features = torch.tanh(self.conv(x.float() / 255 - 0.5)).mean((2, 3))
        return (features,)


if NAME not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(NAME, RandomConvFeatures)
