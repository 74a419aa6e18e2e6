import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """An untrained small student (affine stage + one cascade) with a 2 mm 32^3 preprocessing:
    its map is near the identity, enough to exercise register's whole path."""
    from ldreg.modelfile import save_model
    from ldreg.networks import CascadeSpec, build_network
    from ldreg.preprocessing import Preprocessing

    path = tmp_path_factory.mktemp("model") / "student.pt"
    torch.manual_seed(0)
    model = build_network(CascadeSpec(kind="student", width=4, depth=3, affine=True, affine_width=4))
    save_model(path, model, Preprocessing(spacing_mm=2.0, grid=(32, 32, 32)), {"config": {"steps": 0}}, "student_test")
    return path


def blob_volume(shape=(32, 32, 32), centre=None, radius=6.0):
    """A smooth sphere-like image and its binary label map."""
    centre = np.array(centre if centre is not None else [s / 2 for s in shape])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    dist = np.linalg.norm(grid - centre, axis=-1)
    image = 1 / (1 + np.exp(dist - radius))
    return image.astype(np.float32), (dist < radius).astype(np.int32)
