import numpy as np
import pandas as pd
import pytest
import torch

from conftest import blob_volume
from ldreg.losses import (affine_losses, correlation_loss, critic_loss, distillation_loss, local_ncc_loss,
                          smoothness_loss, with_condition)
from ldreg.preprocessing import Preprocessing
from ldreg.metrics import mean_dice
from ldreg.modelfile import load_model, save_model
from ldreg.networks import CascadeSpec, Critic, affine_field, build_network, complexity, count_parameters
from ldreg.guard import DivergenceGuard, TrainingDiverged
from ldreg.training import ResearchOptions, TrainConfig, train
from ldreg.warp import warp_image, warp_labels


def test_student_is_about_0_3_m_parameters_a_cascade_at_default_width():
    model = build_network(CascadeSpec(kind="student", cascades=3, affine=False))
    per_cascade = [count_parameters(s) for s in model.stages]
    assert all(0.15e6 < p < 0.45e6 for p in per_cascade)
    info = complexity(model, (32, 32, 32))
    assert info["flops"] > 0 and info["parameters"] == sum(per_cascade)


def test_coarse_flow_levels_give_a_full_size_smooth_field_for_fewer_flops():
    x = torch.rand(1, 1, 32, 32, 32)
    flops, fields = [], []
    for level in (0, 1, 2):
        torch.manual_seed(0)
        model = build_network(CascadeSpec(kind="student", affine=False, flow_level=level, flow_scale=1e4))
        flops.append(complexity(model, x.shape[2:])["flops"])
        with torch.no_grad():
            fields.append(model(x, torch.rand_like(x))["flow"])
    assert all(f.shape == (1, 3, 32, 32, 32) for f in fields)
    assert flops[0] > flops[1] > flops[2]
    # upsampled from 8^3, the quarter-level field varies less from voxel to voxel than the full one
    roughness = [float((f[..., 1:] - f[..., :-1]).abs().mean() / f.abs().mean()) for f in fields]
    assert roughness[2] < roughness[0]
    with pytest.raises(ValueError, match="flow_level"):
        build_network(CascadeSpec(kind="student", depth=4, flow_level=4))


def test_a_model_file_written_with_half_res_flow_still_loads(tmp_path):
    # model files written when the option was the boolean half_res_flow
    model = build_network(CascadeSpec(kind="student", width=4, depth=3, affine_width=4, flow_level=1))
    save_model(tmp_path / "m.pt", model, Preprocessing(), {}, "old")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["spec"]["half_res_flow"] = bool(payload["spec"].pop("flow_level"))
    torch.save(payload, tmp_path / "m.pt")
    loaded, _, _ = load_model(tmp_path / "m.pt")
    assert loaded.spec.flow_level == 1
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x)["flow"], model.eval()(x, x)["flow"])


def test_networks_start_at_identity():
    model = build_network(CascadeSpec(kind="teacher", cascades=2, width=4, depth=3))
    x = torch.rand(1, 1, 16, 16, 16)
    out = model(x, torch.rand_like(x))
    assert out["flow"].abs().max() < 1e-2
    matrix, translation = out["affine"]
    assert torch.allclose(matrix, torch.eye(3)[None]) and translation.abs().max() == 0


def test_affine_field_of_translation_and_scaling():
    m = torch.diag(torch.tensor([2.0, 1.0, 1.0]))[None]
    f = affine_field(m, torch.tensor([[0.0, 1.0, 0.0]]), (5, 5, 5))
    # about the centre (2, 2, 2): x -> 2 (x - 2) + 2, y -> y + 1
    assert f[0, 0, 4, 0, 0] == pytest.approx(2.0) and f[0, 1].unique().tolist() == [1.0]


def test_rcn_returns_all_stage_fields_and_composed_field_warps_like_the_chain():
    torch.manual_seed(1)
    model = build_network(CascadeSpec(kind="teacher", cascades=3, width=4, depth=3))
    for stage in model.stages:  # non-trivial, smooth stage outputs
        torch.nn.init.normal_(stage.flow.weight, std=0.05)
    with torch.no_grad():
        model.affine.head.bias.copy_(torch.tensor([0.02, 0, 0, 0.5, 0, 0.98 - 1, 0, -0.3, 0, 0, 1.02 - 1, 0.2]))
    x = torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6, 6), size=(24, 24, 24), mode="trilinear")
    y = torch.rand_like(x)
    with torch.no_grad():
        out = model(x, y)
    assert len(out["fields"]) == 3 + 1
    chained = x
    for field in out["fields"]:
        chained = warp_image(chained, field)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    assert (chained - out["warped"])[inner].abs().max() < 0.05
    assert out["flow"].abs().max() > 0.3  # the test is not passing on a zero field


def test_bad_inputs_get_value_errors():
    model = build_network(CascadeSpec(kind="student", width=4, depth=3))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 1, 12, 16, 16), torch.rand(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="5 dimensions"):
        model(torch.rand(16, 16, 16), torch.rand(16, 16, 16))
    with pytest.raises(ValueError, match="floating"):
        model(torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64), torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown network kind"):
        build_network(CascadeSpec(kind="giant"))


def test_losses_on_known_inputs():
    a = torch.rand(2, 1, 8, 8, 8)
    assert correlation_loss(a, a).item() == pytest.approx(0.0, abs=1e-5)
    assert correlation_loss(a, -a).item() == pytest.approx(2.0, abs=1e-5)
    assert local_ncc_loss(a, a * 3).item() == pytest.approx(0.0, abs=1e-3)
    assert local_ncc_loss(a, torch.rand_like(a)).item() > 0.5
    assert smoothness_loss(torch.ones(1, 3, 8, 8, 8)).item() == 0.0
    det, ortho = affine_losses(torch.eye(3)[None])
    assert det.item() == pytest.approx(0) and ortho.item() == pytest.approx(0, abs=1e-5)
    assert distillation_loss(torch.ones(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), "epe").item() == pytest.approx(3 ** 0.5, rel=1e-4)


def _shifted_pairs(n=4, shape=(32, 32, 32)):
    images, labels, rows = {}, {}, []
    for i in range(n):
        img, lab = blob_volume(shape, centre=[16 + (2 if i % 2 else -2), 16, 16 + (1 if i > 1 else -1)], radius=7)
        images[f"s{i}"], labels[f"s{i}"] = torch.from_numpy(img)[None, None], torch.from_numpy(lab)[None, None]
    for m in images:
        for f in images:
            if m != f:
                rows.append({"pair_id": f"{m}__{f}", "moving": m, "fixed": f})
    return images, labels, pd.DataFrame(rows)


def test_thirty_student_steps_lower_the_loss_and_raise_dice(tmp_path):
    moving, moving_labels = blob_volume((32, 32, 32), centre=[16, 16, 16], radius=7)
    fixed, fixed_labels = blob_volume((32, 32, 32), centre=[18.5, 15, 16], radius=7)  # a shifted pair
    images = {"m": torch.from_numpy(moving)[None, None], "f": torch.from_numpy(fixed)[None, None]}
    pairs = pd.DataFrame([{"pair_id": "m__f", "moving": "m", "fixed": "f"}])
    model = build_network(CascadeSpec(kind="student", width=8, depth=3, affine=False))
    cfg = TrainConfig(steps=30, lr=3e-3, smoothness_weight=0.01, checkpoint_every=1000)
    result = train(model, pairs, images, cfg, tmp_path / "ckpt", show_progress=False)
    model, losses = result.model, result.losses
    assert losses.loss.iloc[-3:].mean() < 0.2 * losses.loss.iloc[0]
    with torch.no_grad():
        flow = model(images["m"], images["f"])["flow"]
    before = mean_dice(moving_labels, fixed_labels)
    after = mean_dice(warp_labels(torch.from_numpy(moving_labels)[None, None], flow)[0, 0].numpy(), fixed_labels)
    assert after > before + 0.1


class _Cache:
    def __init__(self, flows):
        self.flows = flows

    def get(self, pair_id, grid):
        return self.flows[pair_id]


def test_aldk_trains_both_student_and_critic_and_critic_ranks_teacher_higher(tmp_path):
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    # "teacher" fields: smooth and non-zero; the initial student predicts about zero
    teacher = {pid: torch.nn.functional.interpolate(torch.randn(1, 3, 2, 2, 2) * 2, size=(16, 16, 16), mode="trilinear")
               for pid in pairs.pair_id}
    model = build_network(CascadeSpec(kind="student", width=4, depth=3, affine=False))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(steps=6, lr=1e-3, adversarial=True, critic_lr=5e-3, critic_width=4, critic_steps=2, checkpoint_every=1000)
    result = train(model, pairs, images, cfg, tmp_path / "ckpt", flow_cache=_Cache(teacher), show_progress=False)
    model, losses, critic = result.model, result.losses, result.critic
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())]
    assert all(moved), "every student tensor (flow head included) must receive gradient"
    fresh = Critic(width=4)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), critic.state_dict().values()))
    assert "adversarial" in losses and "critic" in losses
    with torch.no_grad():
        t = torch.cat(list(teacher.values()))
        s = torch.cat([model(images[r.moving], images[r.fixed])["flow"] for r in pairs.itertuples()])
        assert critic(t).mean() > critic(s).mean()


def test_adversarial_term_has_gradient_into_the_student():
    critic = Critic(width=4)
    field = torch.zeros(1, 3, 16, 16, 16, requires_grad=True)
    (-critic(field).mean()).backward()
    assert field.grad is not None and field.grad.abs().sum() > 0
    loss, w = critic_loss(critic, torch.randn(1, 3, 16, 16, 16), field, beta=0.1, gp_weight=0.1)
    loss.backward()
    assert all(p.grad is not None for p in critic.parameters())


def test_teacher_hinge_stops_pushing_once_the_student_scores_like_the_teacher():
    from ldreg.losses import adversarial_loss

    def mean_critic(field):  # a critic whose score is the field's mean: easy to place either side
        return field.mean(dim=(1, 2, 3, 4))

    teacher = torch.full((1, 3, 8, 8, 8), 1.0)
    below = torch.full((1, 3, 8, 8, 8), 0.5, requires_grad=True)
    above = torch.full((1, 3, 8, 8, 8), 2.0, requires_grad=True)
    loss = adversarial_loss(mean_critic, below, teacher=teacher, target="teacher")
    loss.backward()
    assert float(loss) == pytest.approx(0.5)
    # below the teacher's score it pulls exactly like the paper's -D(student)
    plain = below.detach().clone().requires_grad_(True)
    adversarial_loss(mean_critic, plain).backward()
    assert torch.allclose(below.grad, plain.grad) and below.grad.abs().sum() > 0
    # past it: no loss and no push
    loss = adversarial_loss(mean_critic, above, teacher=teacher, target="teacher")
    loss.backward()
    assert float(loss) == 0 and above.grad.abs().sum() == 0
    # the same with a real critic, at the teacher's own field
    torch.manual_seed(0)
    critic, field = Critic(width=4), torch.randn(1, 3, 16, 16, 16)
    at_teacher = field.clone().requires_grad_(True)
    loss = adversarial_loss(critic, at_teacher, teacher=field, target="teacher")
    loss.backward()
    assert float(loss) == 0 and at_teacher.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="adversarial_target"):
        TrainConfig.from_dict({"adversarial_target": "beyond"})


def test_feature_matching_pulls_the_student_to_its_teacher_field_and_never_past_it():
    from ldreg.losses import adversarial_loss

    torch.manual_seed(0)
    critic = Critic(width=4)
    # a smooth field, as registration fields are (white noise would mostly fall in the null space
    # of a stride-2 critic's features)
    teacher = torch.nn.functional.interpolate(torch.randn(1, 3, 2, 2, 2) * 2, size=(16, 16, 16), mode="trilinear",
                                              align_corners=True)
    at_teacher = teacher.clone().requires_grad_(True)
    loss = adversarial_loss(critic, at_teacher, teacher=teacher, target="features")
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-7) and float(at_teacher.grad.abs().max()) < 1e-6
    # a field short of the teacher's (0.3x) and one past it (2x): descending the term brings both
    # closer to the teacher's field, never further out (the unbounded -D(student) has no such point)
    for start in (0.3 * teacher, 2.0 * teacher):
        field = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([field], lr=0.05)
        losses, distances = [], []
        for _ in range(60):
            optimiser.zero_grad()
            loss = adversarial_loss(critic, field, teacher=teacher, target="features")
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            distances.append(float((field.detach() - teacher).norm()))
        assert losses[-1] < 0.1 * losses[0]
        assert distances[-1] < float((start - teacher).norm()) and distances[-1] == min(distances[10:])
    with pytest.raises(ValueError, match="needs the pair's teacher field"):
        adversarial_loss(critic, teacher, target="features")
    assert TrainConfig.from_dict({"adversarial_target": "features"}).adversarial_target == "features"


def test_unit_rms_critic_cannot_ask_the_student_for_a_bigger_field():
    from ldreg.losses import adversarial_loss

    torch.manual_seed(0)
    critic = Critic(width=4)
    field = (torch.randn(1, 3, 16, 16, 16) * 2).requires_grad_(True)
    adversarial_loss(critic, field, "unit_rms").backward()
    grad = field.grad
    # the gradient is orthogonal to the field: no push along it (bigger or smaller)
    cosine = float((grad * field).sum() / (grad.norm() * field.norm()))
    assert abs(cosine) < 1e-4 and grad.abs().sum() > 0
    with torch.no_grad():  # the critic's score does not change with the field's scale
        a = adversarial_loss(critic, field, "unit_rms")
        b = adversarial_loss(critic, 5 * field, "unit_rms")
        assert float(a) == pytest.approx(float(b), rel=1e-5)
        assert float(adversarial_loss(critic, field)) != pytest.approx(float(adversarial_loss(critic, 5 * field)))
    loss, _ = critic_loss(critic, torch.randn(1, 3, 16, 16, 16), field, beta=None, gp_weight=10.0,
                          critic_input="unit_rms")
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="critic input"):
        adversarial_loss(critic, field, "other")


def test_pair_conditioned_critic_tells_a_field_that_fits_its_pair_from_one_that_does_not():
    """Two pairs shifted +2 and -2 voxels along x; the teacher's fields are right for their pair,
    the student's swapped. Both sets hold the same two fields, so a field-only critic cannot tell
    them apart; a critic shown the pair can."""
    torch.manual_seed(0)
    blob = torch.from_numpy(blob_volume((16, 16, 16), centre=[8, 8, 8], radius=4)[0])[None, None]
    pairs = []
    for shift in (2.0, -2.0):
        moved = torch.roll(blob, int(shift), dims=2)  # fixed(x) = moving(x + shift)
        field = torch.zeros(1, 3, 16, 16, 16)
        field[:, 2] = -shift
        pairs.append((torch.cat([blob, moved], 1), field))
    teacher = torch.cat([f for _, f in pairs])
    student = torch.cat([pairs[1][1], pairs[0][1]])
    condition = torch.cat([c for c, _ in pairs])
    gaps = {}
    for name, cond, channels in (("field only", None, 3), ("pair", condition, 5)):
        critic = Critic(width=4, in_channels=channels)
        opt = torch.optim.Adam(critic.parameters(), lr=2e-3, betas=(0.5, 0.9))
        for _ in range(60):
            loss, _ = critic_loss(critic, teacher, student, None, 10.0, condition=cond)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            gaps[name] = float(critic(with_condition(teacher, cond)).mean() - critic(with_condition(student, cond)).mean())
    assert abs(gaps["field only"]) < 1e-4  # the same two fields: nothing to tell
    assert gaps["pair"] > 0.5, gaps
    with pytest.raises(ValueError, match="critic input"):
        Critic(width=4, in_channels=5)(teacher)


def test_spectrally_normalised_critic_has_unit_spectral_norm_layers():
    torch.manual_seed(0)
    critic = Critic(width=4, spectral_norm=True).train()
    for _ in range(20):  # power iterations run in training mode
        critic(torch.randn(1, 3, 16, 16, 16))
    layers = [m for m in critic.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))]
    assert len(layers) == 5
    for layer in layers:
        assert float(torch.linalg.matrix_norm(layer.weight.flatten(1), 2)) == pytest.approx(1.0, abs=0.05)
    plain = Critic(width=4)
    assert max(float(torch.linalg.matrix_norm(m.weight.flatten(1), 2)) for m in plain.modules()
               if isinstance(m, torch.nn.Conv3d)) != pytest.approx(1.0, abs=0.05)


def test_normalised_adversarial_term_is_the_raw_one_over_sqrt_field_elements(tmp_path):
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    teacher = {r.pair_id: torch.zeros(1, 3, 16, 16, 16) for r in pairs.itertuples()}
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    terms = {}
    for normalise in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=1, adversarial=True, critic_width=4,
                          research=ResearchOptions(adversarial_normalise=normalise))
        losses = train(build_network(spec), pairs, images, cfg, tmp_path / f"{normalise}.ckpt",
                       flow_cache=_Cache(teacher), show_progress=False).losses
        terms[normalise] = float(losses.adversarial.iloc[0])
    assert terms[True] == pytest.approx(terms[False] / (3 * 16**3) ** 0.5, rel=1e-4)
    with pytest.raises(ValueError, match="research.critic_condition"):
        TrainConfig.from_dict({"research": {"critic_condition": "images"}})
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['critic_condition'\]"):
        TrainConfig.from_dict({"critic_condition": "pair"})  # a research option lives under research


def test_critic_batch_grows_with_its_history_of_student_fields(tmp_path, monkeypatch):
    import ldreg.training as training

    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    teacher = {r.pair_id: torch.full((1, 3, 16, 16, 16), 0.5) for r in pairs.itertuples()}
    seen = []
    real = training.critic_loss

    def spy(critic, t, s, *args):
        assert t.shape == s.shape
        seen.append(s.shape[0])
        return real(critic, t, s, *args)

    monkeypatch.setattr(training, "critic_loss", spy)
    cfg = TrainConfig.from_dict({"steps": 5, "adversarial": True, "research": {"critic_history": 3}, "critic_steps": 1,
                                "critic_width": 4})
    train(build_network(CascadeSpec(kind="student", width=4, depth=3, affine=False)), pairs, images, cfg,
          tmp_path / "c.ckpt", flow_cache=_Cache(teacher), show_progress=False)
    assert seen == [1, 2, 3, 4, 4]
    with pytest.raises(ValueError, match="research.critic_history"):
        TrainConfig.from_dict({"research": {"critic_history": -1}})


def test_teacher_region_keeps_the_teacher_field_where_the_fixed_image_has_signal(tmp_path, monkeypatch):
    import ldreg.training as training
    from ldreg.losses import FOREGROUND_MARGIN, foreground_region

    image, _ = blob_volume((24, 24, 24), centre=[12, 12, 12], radius=5)
    fixed = torch.from_numpy(image)[None, None]
    region = foreground_region(fixed)
    inside = torch.from_numpy(image > 0.1)[None, None]
    # the image's foreground, grown by the margin, and nothing far from it
    assert bool(region[inside].eq(1).all()) and float(region.mean()) < 0.5
    assert float(region[..., 12, 12, 12 + 5 + FOREGROUND_MARGIN]) == 1 and float(region[..., 0, 0, 0]) == 0
    # distillation counts the error inside only, as a mean over the region's voxels
    teacher = torch.zeros(1, 3, 24, 24, 24)
    outside_error = torch.zeros_like(teacher)
    outside_error[:, 0] = 2.0 * (1 - region[:, 0])
    assert float(distillation_loss(outside_error, teacher, "epe")) > 0
    assert float(distillation_loss(outside_error, teacher, "epe", region)) == pytest.approx(0, abs=1e-4)
    inside_error = torch.zeros_like(teacher)
    inside_error[:, 1] = 3.0 * region[:, 0]
    assert float(distillation_loss(inside_error, teacher, "l2", region)) == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(ValueError, match="region"):
        distillation_loss(inside_error, teacher, "l2", region[:, :, :8])
    # in training the critic sees both fields zeroed outside the fixed image's region
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    pairs = pairs.head(1)  # one fixed image, hence one region
    teachers = {r.pair_id: torch.full((1, 3, 16, 16, 16), 0.5) for r in pairs.itertuples()}
    seen = []
    real = training.critic_loss

    def spy(critic, t, s, *args):
        seen.append((t, s))
        return real(critic, t, s, *args)

    monkeypatch.setattr(training, "critic_loss", spy)
    cfg = TrainConfig(steps=2, adversarial=True, adversarial_target="features", critic_steps=1, critic_width=4,
                      research=ResearchOptions(teacher_region="foreground"), distillation="epe",
                      distillation_weight=0.1)
    losses = train(build_network(CascadeSpec(kind="student", width=4, depth=3, affine=False)), pairs, images,
                   cfg, tmp_path / "r.ckpt", flow_cache=_Cache(teachers), show_progress=False).losses
    t, s = seen[0]
    background = foreground_region(images[pairs.fixed.iloc[0]]) == 0
    assert bool(background.any()) and float(t[background.expand_as(t)].abs().max()) == 0
    assert float(s[background.expand_as(s)].abs().max()) == 0 and float(t.abs().max()) == 0.5
    assert np.isfinite(losses.distillation).all() and np.isfinite(losses.adversarial).all()
    with pytest.raises(ValueError, match="research.teacher_region"):
        TrainConfig.from_dict({"research": {"teacher_region": "brain"}})


def test_a_seeded_network_starts_from_the_same_weights():
    spec = CascadeSpec(kind="student", width=4, depth=3)
    a, b, c = build_network(spec, seed=3), build_network(spec, seed=3), build_network(spec, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_training_resumes_from_checkpoint(tmp_path):
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    cfg = TrainConfig(steps=6, lr=1e-3, checkpoint_every=3)
    torch.manual_seed(0)
    full_losses = train(build_network(spec), pairs, images, cfg, tmp_path / "a.ckpt", show_progress=False).losses
    torch.manual_seed(0)
    # an interrupted run: 3 steps (writing the checkpoint at step 3), then a fresh process resumes
    train(build_network(spec), pairs, images, TrainConfig(steps=4, lr=1e-3, checkpoint_every=3), tmp_path / "b.ckpt", show_progress=False)
    torch.manual_seed(0)
    resumed_losses = train(build_network(spec), pairs, images, cfg, tmp_path / "b.ckpt", show_progress=False).losses
    assert len(resumed_losses) == 6
    np.testing.assert_allclose(resumed_losses.loss.values, full_losses.loss.values, rtol=1e-4)


def test_training_stops_with_a_clear_error_when_the_loss_is_not_finite(tmp_path):
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    images = {k: torch.full_like(v, float("nan")) for k, v in images.items()}
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    with pytest.raises(ValueError, match="training diverged at step 1: .*similarity"):
        train(build_network(spec), pairs, images, TrainConfig(steps=3, lr=1e-3), tmp_path / "c.ckpt", show_progress=False)
    assert not (tmp_path / "c.ckpt").exists()


def test_an_absurd_learning_rate_is_caught_and_no_model_leaves(tmp_path):
    """Divergence without NaN: the guard names the model, the step and the symptom."""
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    cfg = TrainConfig(steps=40, lr=50.0, max_restarts=0, checkpoint_every=1000)
    with pytest.raises(TrainingDiverged, match=r"student_x: training diverged at step \d+: (field RMS|similarity loss)"):
        train(build_network(spec), pairs, images, cfg, tmp_path / "d.ckpt", show_progress=False, name="student_x")


def test_a_divergence_is_remedied_from_the_last_good_state(tmp_path, caplog):
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    # lr 50 diverges at once; each remedy halves it from the last good state: 3 halvings are not enough
    cfg = TrainConfig(steps=30, lr=50.0, max_restarts=3, checkpoint_every=1000, validate_every=5)
    with caplog.at_level("WARNING"), pytest.raises(TrainingDiverged, match="3 restart"):
        train(build_network(spec), pairs, images, cfg, tmp_path / "e.ckpt", show_progress=False)
    assert caplog.text.count("back to the last good state") == 3
    # with room for enough halvings the run ends, after restarts from its last validated state
    cfg = TrainConfig(steps=30, lr=1.0, max_restarts=12, checkpoint_every=1000, validate_every=5)
    ok = lambda model: {"dice": 0.5, "folding_percent": 0.0}
    result = train(build_network(spec), pairs, images, cfg, tmp_path / "f.ckpt", show_progress=False,
                   validate=ok)
    losses, val_log = result.losses, result.validation
    assert len(losses) == 30 and np.isfinite(losses.loss).all() and list(losses.step) == list(range(1, 31))
    assert losses.lr.iloc[-1] < 1.0 and val_log.restarts.iloc[0] >= 1


def test_a_sabotaged_critic_is_caught(tmp_path):
    """A critic trained with an absurd rate and no gradient penalty runs away: caught."""
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    teacher = {pid: torch.nn.functional.interpolate(torch.randn(1, 3, 2, 2, 2) * 2, size=(16, 16, 16), mode="trilinear")
               for pid in pairs.pair_id}
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    cfg = TrainConfig(steps=60, lr=1e-3, adversarial=True, critic_lr=1.0, gp_weight=0.0, critic_steps=3,
                      critic_width=4, max_restarts=0, checkpoint_every=1000)
    with pytest.raises(TrainingDiverged, match="training diverged at step"):
        train(build_network(spec), pairs, images, cfg, tmp_path / "g.ckpt", flow_cache=_Cache(teacher),
              show_progress=False)


def test_validation_is_logged_and_guards_folding(tmp_path):
    images, labels, pairs = _shifted_pairs(shape=(16, 16, 16))
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    calls = []

    def validate(model):  # a stand-in scorer: the learning curve records what it returns
        calls.append(model is None)
        return {"dice": 0.5, "folding_percent": 0.0 if len(calls) < 3 else 5.0}

    cfg = TrainConfig(steps=6, lr=1e-3, validate_every=2, max_restarts=0, checkpoint_every=1000)
    with pytest.raises(TrainingDiverged, match="validation folding 5.00 %"):
        train(build_network(spec), pairs, images, cfg, tmp_path / "h.ckpt", show_progress=False, validate=validate)
    calls.clear()
    validate_ok = lambda model: {"dice": 0.5, "folding_percent": 0.0}
    val_log = train(build_network(spec), pairs, images, cfg, tmp_path / "i.ckpt", show_progress=False,
                    validate=validate_ok).validation
    assert list(val_log.step) == [0, 2, 4, 6] and (val_log.cpu_seconds.diff().dropna() >= 0).all()


def test_a_run_that_keeps_diverging_can_end_at_its_last_good_state(tmp_path):
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    cfg = TrainConfig(steps=30, lr=50.0, max_restarts=1, on_exhausted="last_good", checkpoint_every=1000,
                      validate_every=5)
    ok = lambda model: {"dice": 0.5, "folding_percent": 0.0}
    torch.manual_seed(0)
    result = train(build_network(spec), pairs, images, cfg, tmp_path / "j.ckpt",
                   show_progress=False, validate=ok)
    stopped = result.stopped
    assert stopped["step"] >= 1 and stopped["kept_step"] == 0 and "field" in stopped["symptom"]
    assert not hasattr(result.model, "diverged")  # the result says why, not an attribute on the network
    assert len(result.losses) == 0 and "diverged at step" in result.validation.stopped.iloc[0]
    # the model is the last good state (step 0: the network as built), not the diverged one
    torch.manual_seed(0)
    fresh = build_network(spec)
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), fresh.state_dict().values()))


def test_a_checkpoint_from_other_settings_is_not_resumed(tmp_path, caplog):
    images, _, pairs = _shifted_pairs(shape=(16, 16, 16))
    spec = CascadeSpec(kind="student", width=4, depth=3, affine=False)
    train(build_network(spec), pairs, images, TrainConfig(steps=4, lr=1e-3, checkpoint_every=3), tmp_path / "k.ckpt",
          show_progress=False)
    with caplog.at_level("WARNING"):
        losses = train(build_network(spec), pairs, images, TrainConfig(steps=6, lr=5e-4, checkpoint_every=3),
                       tmp_path / "k.ckpt", show_progress=False).losses
    assert "other training settings (lr)" in caplog.text and losses.step.iloc[0] == 1


def test_guard_lets_a_young_critic_learn_but_catches_a_run_away():
    guard = DivergenceGuard((32, 32, 32))
    terms = {"similarity": 0.5, "loss": 0.5}
    # a critic learning to separate teacher from student: 0.3 -> 4 within 30 steps
    for step in range(60):
        estimate = 0.3 + min(step, 30) * 0.12
        assert guard.step(terms, field_rms=1.0, critic=-estimate) is None
    # a trained critic's estimate jumping tenfold in one step is a run-away
    assert "critic estimate ran away" in guard.step(terms, field_rms=1.0, critic=-60.0)


def test_guard_forgives_an_early_dip_below_no_registration_but_not_a_late_one_or_folding():
    guard = DivergenceGuard((32, 32, 32))
    identity = {"dice": 0.166, "folding_percent": 0.0}
    dip = {"dice": 0.138, "folding_percent": 0.0}
    assert guard.validation({**dip, "step": 100}, identity) is None
    assert "below no registration" in guard.validation({**dip, "step": 200}, identity)
    assert "folding" in guard.validation({"dice": 0.3, "folding_percent": 5.0, "step": 100}, identity)
    assert guard.validation({"dice": 0.2, "folding_percent": 0.0, "step": 200}, identity) is None
