"""The evaluation classifier: a small CNN giving log-probabilities and features."""

from __future__ import annotations

import flax.linen as nn
import jax

from vcl_jax.models.layers import Conv, max_pool2


class Classifier(nn.Module):
    """conv(w)→pool→conv(2w)→pool→conv(2w)→dense(features)→dense(classes).

    Attributes:
      num_classes: number of classes.
      width: channels of the first conv.
      features: size of the penultimate (feature) layer.
      impl: convolution implementation.
    """

    num_classes: int = 10
    width: int = 32
    features: int = 128
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, *, return_features: bool = False):
        """``x: [B, H, W, C]`` in [0, 1] → log-probabilities ``[B, classes]``
        (and features ``[B, features]`` when ``return_features``)."""
        init = nn.initializers.he_normal()
        w = self.width
        x = max_pool2(nn.relu(Conv(w, 3, impl=self.impl, kernel_init=init)(x)))
        x = max_pool2(nn.relu(Conv(2 * w, 3, impl=self.impl, kernel_init=init)(x)))
        x = nn.relu(Conv(2 * w, 3, impl=self.impl, kernel_init=init)(x))
        feats = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))
        logp = jax.nn.log_softmax(nn.Dense(self.num_classes)(feats))
        return (logp, feats) if return_features else logp
