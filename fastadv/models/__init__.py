"""Models: CIFAR ResNet-18, PreAct-ResNet-18, WRN-34-10, VGG-11 (BN) and a small CNN, plus any timm model.

Every model has ``features(x)`` (penultimate pooled features, ``(B, feature_dim)``), ``head`` (the final
``nn.Linear``), ``feature_dim``, ``forward(x) == head(features(x))``, and ``cam_layer`` /
``cam_layer_name``: the last convolutional block, the default target layer of :mod:`fastadv.cam`.

=================  ======================  ==============
name               class                   ``cam_layer_name``
=================  ======================  ==============
``resnet18``       :class:`ResNet`         ``layer4``
``preact_resnet18`` :class:`PreActResNet`  ``layer4``
``wrn34_10``       :class:`WideResNet`     ``block3``
``vgg11``          :class:`VGG`            ``last_block``
``small_cnn``      :class:`SmallCNN`       ``block3``
(timm name)        :class:`TimmModel`      ``model.<last feature_info stage>``
=================  ======================  ==============
"""

from .base import FeatureModel, NormalizedModel, with_normalization
from .registry import TimmModel, create_model, list_models, register_model
from .resnet import PreActResNet, ResNet, preact_resnet18, resnet18
from .small_cnn import SmallCNN, small_cnn
from .vgg import VGG, vgg11
from .wrn import WideResNet, wrn

__all__ = [
    "VGG",
    "FeatureModel",
    "NormalizedModel",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "TimmModel",
    "WideResNet",
    "create_model",
    "list_models",
    "preact_resnet18",
    "register_model",
    "resnet18",
    "small_cnn",
    "vgg11",
    "with_normalization",
    "wrn",
]
