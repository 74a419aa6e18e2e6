"""The paper's networks: affine stage, VTN-style dense stage, RCN teacher, LDR student, critic.

All are fully convolutional 3D networks on any grid divisible by 2^depth; every network that
predicts a transform starts at (or next to) the identity so training begins from "no motion".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .checks import check_divisible, check_volume_batch
from .conv import Conv3d
from .defaults import PRECISION_NAMES
from .warp import compose, warp_image


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.1, inplace=True))


def _as_conv_input(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``x`` in the dtype and memory format of ``conv``'s weights, which
    :func:`prepare_for_inference` may have made bfloat16 and channels-last."""
    fmt = torch.channels_last_3d if conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and \
        not conv.weight.is_contiguous() else torch.contiguous_format
    return x.to(dtype=conv.weight.dtype, memory_format=fmt)


class AffineNet(nn.Module):
    """Affine sub-network: a strided conv encoder on (moving, fixed), global pooling and a linear
    head giving a 3x4 matrix ``[W | t]`` with the voxel map ``x -> (I + W)(x - c) + c + t`` about
    the grid centre ``c``. The head starts at zero, i.e. the identity."""

    def __init__(self, width: int = 16, depth: int = 5):
        super().__init__()
        chans = [2] + [min(width * 2**i, 8 * width) for i in range(depth)]
        self.encoder = nn.Sequential(*[_conv(chans[i], chans[i + 1], stride=2) for i in range(depth)])
        self.head = nn.Linear(chans[-1], 12)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        x = _as_conv_input(torch.cat([moving, fixed], 1), self.encoder[0][0])
        features = self.encoder(x).mean(dim=(2, 3, 4)).to(self.head.weight.dtype)
        params = self.head(features).view(-1, 3, 4).to(moving.dtype)
        matrix = torch.eye(3, device=params.device, dtype=params.dtype) + params[:, :, :3]
        # translation in units of the half grid size, so that it moves as fast as the matrix
        # entries do under the optimiser (in raw voxels it would crawl)
        half = torch.tensor([s / 2 for s in moving.shape[2:]], device=params.device, dtype=params.dtype)
        return matrix, params[:, :, 3] * half


def affine_field(matrix: torch.Tensor, translation: torch.Tensor, shape) -> torch.Tensor:
    """Dense displacement (B, 3, *shape) in voxels of an affine map about the grid centre:
    ``u(x) = (M - I)(x - c) + t``, summed from one centred axis per dimension by broadcasting
    (one full-size pass instead of a 3 x N coordinate matrix product)."""
    b = matrix.shape[0]
    linear = matrix - torch.eye(3, device=matrix.device, dtype=matrix.dtype)
    field = translation.reshape(b, 3, 1, 1, 1)
    for k, size in enumerate(shape):
        axis = torch.arange(size, device=matrix.device, dtype=matrix.dtype) - (size - 1) / 2
        view = [1, 1, 1, 1, 1]
        view[2 + k] = size
        field = field + linear[:, :, k].reshape(b, 3, 1, 1, 1) * axis.view(view)
    return field


def compose_after_affine(affine_flow: torch.Tensor, matrix: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``compose(affine_flow, step)`` in closed form: an affine displacement ``a`` is linear, so
    ``step + a(x + step) = a(x) + M step`` -- no resampling of the affine field (which costs a
    3-channel grid_sample) and no interpolation error. Unlike the sampled form it extrapolates
    the affine map past the volume's border instead of clamping."""
    return affine_flow + torch.einsum("bij,bj...->bi...", matrix, step)


class DenseNet(nn.Module):
    """Encoder-decoder with skips predicting a dense displacement field (VTN / LDR style).

    ``enc_channels`` are the stride-2 encoder widths, deepest last; the decoder upsamples,
    concatenates the matching skip and convolves, ending in a 3-channel flow conv at full
    resolution whose weights start near zero (a near-identity initial field)."""

    def __init__(self, enc_channels, dec_channels=None, flow_scale: float = 1.0, flow_level: int = 0):
        super().__init__()
        enc_channels = list(enc_channels)
        self.depth = len(enc_channels)
        dec_channels = list(dec_channels or enc_channels[::-1])
        if len(dec_channels) != self.depth:
            raise ValueError(f"dec_channels needs {self.depth} entries, got {dec_channels}")
        # flow_level k: stop the decoder at 1/2^k resolution and upsample the 3-channel field
        # instead of features -- the fine convolutions are most of the FLOPs, and a coarse field
        # is smooth by construction (the per-pair optimiser's best residual grid is a quarter)
        if not 0 <= flow_level < self.depth:
            raise ValueError(f"flow_level must be between 0 and {self.depth - 1}, got {flow_level}")
        self.flow_level = flow_level
        if flow_level:
            dec_channels = dec_channels[:-flow_level]
        chans = [2] + enc_channels
        self.encoders = nn.ModuleList(_conv(chans[i], chans[i + 1], stride=2) for i in range(self.depth))
        # decoder level k upsamples to the resolution of encoder level depth-2-k (or the input)
        skips = chans[:-1][::-1]  # skip widths from deep to shallow; last is the 2-channel input
        self.decoders = nn.ModuleList()
        cin = enc_channels[-1]
        for cout, skip in zip(dec_channels, skips):
            self.decoders.append(_conv(cin + skip, cout))
            cin = cout
        self.flow = Conv3d(cin, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)
        self.flow_scale = flow_scale

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_divisible("DenseNet input", moving.shape[2:], 2**self.depth)
        x = _as_conv_input(torch.cat([moving, fixed], 1), self.encoders[0][0])
        skips = [x]
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        skips.pop()  # the deepest output is x itself
        for dec in self.decoders:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = dec(torch.cat([x, skip], 1))
        flow = self.flow(x).to(moving.dtype, memory_format=torch.contiguous_format) * self.flow_scale
        if self.flow_level:  # the field is in full-resolution voxels already; only resample it
            flow = F.interpolate(flow, size=moving.shape[2:], mode="trilinear", align_corners=False)
        return flow


@dataclass
class CascadeSpec:
    """Everything needed to rebuild a cascaded network; stored in model files."""

    kind: str  # "teacher" (RCN), "student" (LDR) or "voxelmorph" (peer baseline)
    cascades: int = 1
    width: int = 16
    depth: int = 4
    affine: bool = True
    affine_width: int = 16
    # the field predicted at 1/2^flow_level of the input resolution and upsampled (0: full)
    flow_level: int = 0
    # the flow conv's output multiplied by this: under Adam (steps of about lr whatever the
    # gradient) it sets how fast the field can grow, as VTN's flow multiplier does
    flow_scale: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def dense_channels(kind: str, width: int, depth: int):
    """Channel plans: the teacher's VTN doubles per level (capped at 8x), the LDR student keeps
    16-32 channels (``width`` then ``2*width``), about 0.3 M parameters a cascade at width 16."""
    if kind == "teacher":
        enc = [min(width * 2**i, 8 * width) for i in range(depth)]
        return enc, enc[::-1]
    if kind == "student":
        enc = [width] + [2 * width] * (depth - 1)
        return enc, [2 * width] * (depth - 1) + [width]
    raise ValueError(f"unknown network kind {kind!r}: expected 'teacher', 'student' or 'voxelmorph'")


class VoxelMorphStage(nn.Module):
    """The VoxelMorph peer (Balakrishnan et al. / Dalca et al.): MONAI's VoxelMorph U-Net
    predicting a stationary velocity field, integrated by scaling and squaring."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        from monai.networks.blocks import DVF2DDF
        from monai.networks.nets import VoxelMorphUNet

        self.depth = depth
        channels = tuple([width, 2 * width] + [2 * width] * (2 * depth - 2))  # MONAI wants pairs
        self.backbone = VoxelMorphUNet(3, 2, 2 * width, channels, (width, width))
        self.integrate = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_divisible("VoxelMorph input", moving.shape[2:], 2**self.depth)
        return self.integrate(self.backbone(torch.cat([moving, fixed], 1)))


def make_stage(spec: "CascadeSpec") -> nn.Module:
    if spec.kind == "voxelmorph":
        return VoxelMorphStage(spec.width, spec.depth)
    enc, dec = dense_channels(spec.kind, spec.width, spec.depth)
    return DenseNet(enc, dec, flow_scale=spec.flow_scale, flow_level=spec.flow_level)


class CascadedRegistration(nn.Module):
    """Affine stage (optional) followed by ``cascades`` dense stages (RCN when kind='teacher',
    LDR when kind='student'). Stage k sees the moving image warped by the composition of the
    stages before it and predicts a further displacement; the fields are composed, and the
    original moving image is warped once by the composed field (no repeated interpolation)."""

    def __init__(self, spec: CascadeSpec):
        super().__init__()
        if not 1 <= spec.cascades <= 20:
            raise ValueError(f"cascades must be between 1 and 20, got {spec.cascades}")
        self.spec = spec
        self.affine = AffineNet(spec.affine_width) if spec.affine else None
        self.stages = nn.ModuleList(make_stage(spec) for _ in range(spec.cascades))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, upto: int | None = None, warp: bool = True) -> dict:
        """Returns ``fields`` (one per stage: the affine first when present), ``flow`` (the
        composed field), ``warped`` and, when there is an affine stage, ``affine`` (matrix,
        translation). ``upto`` stops after that many dense stages (0: affine only);
        ``warp=False`` skips warping by the final field (inference needs only the field)."""
        check_volume_batch("moving", moving, channels=1)
        check_volume_batch("fixed", fixed, channels=1)
        if moving.shape != fixed.shape:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have one shape")
        check_divisible("registration input", moving.shape[2:], 2**self.spec.depth)
        out: dict = {"fields": []}
        flow = matrix = None
        if self.affine is not None:
            matrix, translation = self.affine(moving, fixed)
            flow = affine_field(matrix, translation, moving.shape[2:])
            out["affine"] = (matrix, translation)
            out["fields"].append(flow)
        stages = list(self.stages if upto is None else self.stages[:upto])
        warped = moving if flow is None or not (stages or warp) else warp_image(moving, flow)
        for k, stage in enumerate(stages):
            step = stage(warped, fixed)
            out["fields"].append(step)
            if flow is None:
                flow = step
            elif k == 0 and matrix is not None:
                flow = compose_after_affine(flow, matrix, step)
            else:
                flow = compose(flow, step)
            if warp or k + 1 < len(stages):
                warped = warp_image(moving, flow)
        if flow is None:
            flow = torch.zeros(moving.shape[0], 3, *moving.shape[2:], device=moving.device, dtype=moving.dtype)
        out["flow"] = flow
        if warp:
            out["warped"] = warped
        return out


class Critic(nn.Module):
    """WGAN critic over displacement fields: strided 3D convs (no normalisation, as WGAN-GP
    requires), global average pooling and a linear score. Works on any grid size. ``in_channels``
    3 for a field alone, 5 for a field beside its image pair; ``spectral_norm`` bounds its
    Lipschitz constant by construction."""

    def __init__(self, width: int = 16, depth: int = 4, in_channels: int = 3, spectral_norm: bool = False):
        super().__init__()
        self.in_channels = in_channels
        chans = [in_channels] + [min(width * 2**i, 8 * width) for i in range(depth)]
        self.features = nn.Sequential(*[_conv(chans[i], chans[i + 1], stride=2) for i in range(depth)])
        self.score = nn.Linear(chans[-1], 1)
        if spectral_norm:
            # every layer's weight divided by its largest singular value (Miyato et al. 2018): with
            # 1-Lipschitz activations and mean pooling the score is (about) 1-Lipschitz everywhere,
            # not only where a gradient penalty samples it
            for layer in [m for m in self.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]:
                nn.utils.parametrizations.spectral_norm(layer)

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        return self.score(self.feature_maps(field)[-1].mean(dim=(2, 3, 4))).squeeze(-1)

    def feature_maps(self, field: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's activation map (the critic's learned description of a field); the score
        is read from the last."""
        check_volume_batch("critic input", field, channels=self.in_channels)
        maps = []
        for layer in self.features:
            field = layer(field)
            maps.append(field)
        return maps


PRECISIONS = {name: getattr(torch, name) for name in PRECISION_NAMES}


def prepare_for_inference(model: CascadedRegistration, precision: str = "float32",
                          channels_last: bool = False) -> CascadedRegistration:
    """Convert the convolutions for CPU inference in place: ``bfloat16`` runs them on the CPU's
    bf16 units (AMX / AVX512-BF16, through oneDNN) and channels-last 3D is the layout oneDNN's
    fast 3D kernels use. Fields, warps and the affine head stay float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    for part in model.modules():
        if isinstance(part, (AffineNet, DenseNet)):  # the networks whose forward casts its input
            for conv in part.modules():
                if isinstance(conv, nn.Conv3d):
                    conv.to(dtype=PRECISIONS[precision], memory_format=fmt)
    return model.eval()


def build_network(spec: CascadeSpec | dict, seed: int | None = None) -> CascadedRegistration:
    """The network of ``spec``; with ``seed``, its initial weights are that seed's (training
    jobs pass the config's seed: before, the weights came from an unseeded generator and two
    default runs of one config differed by up to 0.03 Dice per model)."""
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(spec, dict):
        spec = dict(spec)
        if "half_res_flow" in spec:  # model files written before flow_level replaced it
            spec["flow_level"] = int(spec.pop("half_res_flow"))
        spec = CascadeSpec(**spec)
    return CascadedRegistration(spec)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def complexity(model: nn.Module, shape) -> dict:
    """Parameters and FLOPs of one forward pass on a pair of ``shape`` (torch's flop counter:
    convolutions and matmuls; the grid sampling of the warps is not counted)."""
    moving = torch.zeros(1, 1, *shape)
    counter = FlopCounterMode(display=False)
    # torch's own convolution everywhere: the counter knows aten.convolution, not oneDNN's op (ldreg.conv)
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False), counter:
        model(moving, moving.clone())
    return {"parameters": count_parameters(model), "flops": int(counter.get_total_flops()), "grid": list(shape)}
