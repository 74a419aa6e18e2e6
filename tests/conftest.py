import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def blob_volume(shape=(32, 32, 32), centre=None, radius=6.0):
    """A smooth sphere-like image and its binary label map."""
    centre = np.array(centre if centre is not None else [s / 2 for s in shape])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    dist = np.linalg.norm(grid - centre, axis=-1)
    image = 1 / (1 + np.exp(dist - radius))
    return image.astype(np.float32), (dist < radius).astype(np.int32)
