import pandas as pd
import pytest
import torch

from conftest import blob_volume
from ldreg.metrics import mean_dice
from ldreg.networks import CascadeSpec, build_network
from ldreg.training import TrainConfig, train
from ldreg.warp import warp_labels


def test_ants_syn_recovers_a_shift():
    pytest.importorskip("ants", reason="antspyx is in the [peers] and [test] extras")
    from ldreg.peers import ants_syn_field

    moving, moving_labels = blob_volume((32, 32, 32), centre=[15, 16, 16], radius=7)
    fixed, fixed_labels = blob_volume((32, 32, 32), centre=[18, 16, 16], radius=7)
    field = ants_syn_field(moving, fixed, spacing=2.0)
    assert field.shape == (3, 32, 32, 32)
    # fixed voxel x corresponds to moving x - 3 along the first axis, near the blob
    assert field[0, 18, 16, 16] == pytest.approx(-3, abs=0.75)
    warped = warp_labels(torch.from_numpy(moving_labels)[None, None], torch.from_numpy(field)[None])[0, 0].numpy()
    assert mean_dice(warped, fixed_labels) > mean_dice(moving_labels, fixed_labels) + 0.2


def test_voxelmorph_peer_trains_with_the_same_loop(tmp_path):
    moving, _ = blob_volume((32, 32, 32), centre=[16, 16, 16], radius=7)
    fixed, _ = blob_volume((32, 32, 32), centre=[18.5, 15, 16], radius=7)
    images = {"m": torch.from_numpy(moving)[None, None], "f": torch.from_numpy(fixed)[None, None]}
    pairs = pd.DataFrame([{"pair_id": "m__f", "moving": "m", "fixed": "f"}])
    model = build_network(CascadeSpec(kind="voxelmorph", width=8, depth=3, affine=False))
    _, losses, _, _ = train(model, pairs, images, TrainConfig(steps=30, lr=3e-3, smoothness_weight=0.01), tmp_path / "c",
                         show_progress=False)
    assert losses.loss.iloc[-3:].mean() < 0.5 * losses.loss.iloc[0]
