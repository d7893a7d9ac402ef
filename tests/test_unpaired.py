"""The unpaired training steps (`bone3d.engines.unpaired`): CycleGAN, StarGAN, FUNIT."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer

from bone3d.engines.unpaired import CycleGANStep, FUNITStep, ImagePool, StarGANStep
from bone3d.nets import build


def _nets(seed=0):
    torch.manual_seed(seed)
    return (
        build("cyclegan_g", 2, "tiny"),
        build("cyclegan_g", 2, "tiny"),
        build("nlayer_d", 2, "tiny", in_channels=1),
        build("nlayer_d", 2, "tiny", in_channels=1),
    )


def _run(g_ab, step, data):
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=g_ab,
        optimizer=torch.optim.Adam(list(g_ab.parameters()) + list(step.g_ba.parameters()), 1e-3),
        loss_function=torch.nn.L1Loss(),
        iteration_update=step,
    )
    trainer.run()
    return trainer.state.output[0]


def _data():
    g = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.rand(3, 1, 32, 32, generator=g),
            "label": torch.rand(3, 1, 32, 32, generator=g),
        }
    ]


def test_every_network_learns_and_losses_are_reported():
    g_ab, g_ba, d_a, d_b = _nets()
    before = [[p.detach().clone() for p in m.parameters()] for m in (g_ab, g_ba, d_a, d_b)]
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), 1e-3)
    out = _run(g_ab, CycleGANStep(g_ba, d_a, d_b, d_opt), _data())
    for b, m in zip(before, (g_ab, g_ba, d_a, d_b), strict=True):
        assert any(not torch.equal(x, y) for x, y in zip(b, m.parameters(), strict=True))
    for key in ("loss", "loss_g_gan", "loss_cycle", "loss_idt", "loss_d_a", "loss_d_b"):
        assert torch.isfinite(torch.tensor(out[key])), key
    assert all(p.requires_grad for d in (d_a, d_b) for p in d.parameters())


def test_cycle_loss_is_the_round_trip_on_unpaired_batches():
    """The reported cycle loss equals L1(G_BA(G_AB(a)), a) + L1(G_AB(G_BA(b)), b) with b the HR
    patches rolled along the batch (no LR patch is paired with its own HR patch)."""
    g_ab, g_ba, d_a, d_b = _nets()
    ref_ab, ref_ba = copy.deepcopy(g_ab).train(), copy.deepcopy(g_ba).train()
    data = _data()
    a, b = data[0]["image"], torch.roll(data[0]["label"], 1, 0)
    with torch.no_grad():
        expected = F.l1_loss(ref_ba(ref_ab(a)), a) + F.l1_loss(ref_ab(ref_ba(b)), b)
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), 1e-3)
    out = _run(g_ab, CycleGANStep(g_ba, d_a, d_b, d_opt), data)
    assert out["loss_cycle"] == pytest.approx(float(expected), rel=1e-5)


def test_identity_term_skipped_when_domains_differ_in_channels():
    torch.manual_seed(0)
    g_ab = build("cyclegan_g", 2, "tiny", in_channels=3)  # a 3-slice slab in, one slice out
    g_ba = build("cyclegan_g", 2, "tiny", in_channels=1, out_channels=3)
    d_a = build("nlayer_d", 2, "tiny", in_channels=3)
    d_b = build("nlayer_d", 2, "tiny", in_channels=1)
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), 1e-3)
    data = [{"image": torch.rand(2, 3, 32, 32), "label": torch.rand(2, 1, 32, 32)}]
    out = _run(g_ab, CycleGANStep(g_ba, d_a, d_b, d_opt), data)
    assert out["loss_idt"] == 0.0 and out["loss_cycle"] > 0


def test_image_pool_returns_history_once_full():
    random.seed(0)
    pool = ImagePool(2)
    first = torch.arange(2.0).reshape(2, 1)
    assert torch.equal(pool.query(first), first)  # filling: returned as is
    seen = set()
    for i in range(20):
        new = torch.full((1, 1), 10.0 + i)
        got = float(pool.query(new)[0, 0])
        assert got == 10.0 + i or got in {0.0, 1.0} | seen
        seen.add(10.0 + i)
    assert any(float(x) >= 10 for x in torch.cat(pool.images))  # history was refreshed


def test_ragan_is_refused():
    g_ab, g_ba, d_a, d_b = _nets()
    with pytest.raises(ValueError, match="vanilla, lsgan or hinge"):
        CycleGANStep(g_ba, d_a, d_b, torch.optim.Adam(d_a.parameters()), gan_loss="ragan")


def test_image_pools_round_trip_through_a_checkpoint(tmp_path):
    """The pools are checkpointed (``CycleGANStep.state_dict``): a restored step answers the
    next queries exactly as the original does, so a resumed CycleGAN replays its D history."""
    g_ab, g_ba, d_a, d_b = _nets()
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), 1e-3)
    step = CycleGANStep(g_ba, d_a, d_b, d_opt, pool_size=3)
    for i in range(5):
        step.pool_a.query(torch.full((2, 1, 4, 4), float(i)))
        step.pool_b.query(torch.full((2, 1, 4, 4), -float(i)))
    torch.save(step.state_dict(), tmp_path / "pools.pt")
    restored = CycleGANStep(g_ba, d_a, d_b, d_opt, pool_size=50)
    restored.load_state_dict(torch.load(tmp_path / "pools.pt", weights_only=True))
    assert restored.pool_a.size == 3 and len(restored.pool_b.images) == 3
    new = torch.full((4, 1, 4, 4), 9.0)
    random.seed(5)
    expected = step.pool_a.query(new)
    random.seed(5)
    torch.testing.assert_close(restored.pool_a.query(new), expected)


# --- StarGAN --------------------------------------------------------------------------------


def _stargan(seed=0, n_critic=1):
    torch.manual_seed(seed)
    g = build("stargan", 2, "tiny")
    d = build("stargan_d", 2, "tiny", image_size=32, c_dim=2)
    step = StarGANStep(d, torch.optim.Adam(d.parameters(), 1e-3), n_critic=n_critic)
    return g, d, step


def _patch_batch(n=2, depth=1, seed=1):
    """A TorchIO-style batch of 3D patches (B, 1, 32, 32, depth): LR = blurred HR."""
    g = torch.Generator().manual_seed(seed)
    hr = (torch.rand(n, 1, 32, 32, depth, generator=g) > 0.6).float()
    lr = F.avg_pool3d(hr, (5, 5, 1), stride=1, padding=(2, 2, 0))
    return [{"image": {"data": lr}, "target": {"data": hr}}]


def _train(net, step, data, epochs=1, opt=None):
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=data,
        network=net,
        optimizer=opt or torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=torch.nn.L1Loss(),
        iteration_update=step,
    )
    trainer.run()
    return trainer.state.output[0]


def test_stargan_step_trains_g_every_n_critic_and_d_every_iteration():
    g, d, step = _stargan(n_critic=2)
    step.slab = 0  # 2D: (B, 1, 32, 32, 1) patches are slices
    g0 = [p.detach().clone() for p in g.parameters()]
    d0 = [p.detach().clone() for p in d.parameters()]
    out = _train(g, step, _patch_batch())  # iteration 1: D only
    assert all(torch.equal(a, b) for a, b in zip(g0, g.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters(), strict=True))
    for key in ("loss", "loss_g_gan", "loss_cls", "loss_rec", "loss_d", "loss_gp", "d_real"):
        assert torch.isfinite(torch.tensor(out[key])), key
    assert out["pred"].shape == (1, 32, 32)  # decollated: one item
    out = _train(g, step, _patch_batch() * 2)  # a fresh trainer: iterations 1 and 2
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters(), strict=True))


def test_stargan_gradient_penalty_is_wgan_gp():
    """GP = mean over samples of (||dD/dx_hat||_2 - 1)^2: for D(x) = 2 sum(x) the gradient is 2
    everywhere, so GP = (2 sqrt(N) - 1)^2 with N the voxels of one sample."""

    class Linear(torch.nn.Module):
        def forward(self, x):
            return 2 * x.flatten(1).sum(1, keepdim=True), x.new_zeros(x.shape[0], 2)

    step = StarGANStep(Linear(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1))
    real, fake = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    gp = step._gradient_penalty(real, fake)
    assert float(gp) == pytest.approx((2 * 8 - 1) ** 2, rel=1e-5)


def test_stargan_d_learns_to_tell_the_domains_apart():
    g, d, step = _stargan(n_critic=100)  # D alone
    step.slab = 0
    first = _train(g, step, _patch_batch())["loss_d_cls"]
    last = _train(g, step, _patch_batch() * 80)["loss_d_cls"]
    assert last < 0.3 * first


def test_stargan_translator_slab_to_centre_slice():
    g = build("stargan", 2, "tiny", in_channels=5, out_channels=1)
    assert g.generator.main[0].in_channels == 5 + 2  # slab + one-hot domain
    x = torch.rand(2, 5, 16, 16)
    with torch.no_grad():
        c = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
        torch.testing.assert_close(g.eval()(x), g.generator(x, c)[:, 2:3])
    from bone3d.errors import InputError

    with pytest.raises(InputError, match="centred"):
        build("stargan", 2, "tiny", in_channels=4, out_channels=1)  # no centre slice


# --- FUNIT ----------------------------------------------------------------------------------


def test_funit_step_trains_g_and_d_and_stores_the_micro_ct_code():
    torch.manual_seed(0)
    g = build("funit", 2, "tiny")
    d = build("funit_d", 2, "tiny", num_classes=2)
    step = FUNITStep(d, torch.optim.RMSprop(d.parameters(), 1e-4), slab=0)
    g0 = [p.detach().clone() for p in g.generator.parameters()]
    d0 = [p.detach().clone() for p in d.parameters()]
    out = _train(g, step, _patch_batch() * 2)
    for before, m in ((g0, g.generator), (d0, d)):
        assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    for key in ("loss", "loss_g_gan", "loss_rec", "loss_g_fm", "loss_d", "loss_r1"):
        assert torch.isfinite(torch.tensor(out[key])) and out[key] != 0.0, key
    assert int(g.n_codes) == 2 and float(g.class_code.abs().sum()) > 0
    # the moving average followed the two G steps but is not the trained generator
    assert int(g.n_averaged) == 2
    pairs = list(zip(g.generator_test.parameters(), g.generator.parameters(), strict=True))
    assert all(not a.requires_grad for a, _ in pairs)
    assert any(not torch.equal(a, b) for a, b in pairs)
    moved = zip(g0, g.generator_test.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in moved)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        pred = g.eval()(x)
        code = g.class_code.expand(1, -1)
        by_test = g.generator_test.decode(g.generator_test.enc_content(x), code)
        by_trained = g.generator.decode(g.generator.enc_content(x), code)
    assert pred.shape == (1, 1, 32, 32)
    torch.testing.assert_close(pred, by_test)  # translates with the average
    assert not torch.allclose(pred, by_trained)


def test_funit_test_generator_is_a_ramped_moving_average():
    """First update: a copy; update n + 1: decay min(ema_decay, (1 + n) / (10 + n))."""
    g = build("funit", 2, "tiny", ema_decay=0.5)
    p_test, p_trained = next(g.generator_test.parameters()), next(g.generator.parameters())
    expected = None
    for n, value in enumerate([1.0, 3.0, 7.0, 7.0]):
        with torch.no_grad():
            p_trained.fill_(value)
        g.update_test()
        decay = min(0.5, (1 + n) / (10 + n)) if n else 0.0  # 0, 2/11, 3/12, 0.5
        expected = value if expected is None else decay * expected + (1 - decay) * value
        torch.testing.assert_close(p_test, torch.full_like(p_test, expected))
    assert int(g.n_averaged) == 4
    from bone3d.errors import InputError

    with pytest.raises(InputError, match="ema_decay"):
        build("funit", 2, "tiny", ema_decay=1.0)


def test_funit_class_code_is_the_mean_then_an_exponential_average():
    g = build("funit", 2, "tiny", momentum=0.25)
    a, b, c = torch.full((3, 8), 1.0), torch.full((2, 8), 3.0), torch.full((1, 8), 10.0)
    g.update_class_code(a)
    torch.testing.assert_close(g.class_code, torch.full((1, 8), 1.0))
    g.update_class_code(b)  # exact mean of the two batch means
    torch.testing.assert_close(g.class_code, torch.full((1, 8), 2.0))
    for _ in range(2):  # batches 3 and 4: weight max(1/n, 0.25)
        g.update_class_code(c)
    torch.testing.assert_close(g.class_code, torch.full((1, 8), 2.0 + 8 * (1 - 2 / 3 * 3 / 4)))


def test_funit_r1_penalty_is_the_squared_gradient_of_the_real_response():
    """R1 = sum |d mean(D(x_b)) / d x_b|^2 / B: for D(x) = s x (s = 3) every element of the
    gradient is s / N (N = elements of the response), so R1 = s^2 / (N B)."""

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, x, y):
            return self.s * x, x

    torch.manual_seed(0)
    g = build("funit", 2, "tiny")
    d = Scale()
    step = FUNITStep(d, torch.optim.SGD(d.parameters(), 0.0), slab=0)
    out = _train(g, step, _patch_batch(n=2))
    n = 4 * 32 * 32  # content LR + HR: 4 class images of 32 x 32
    assert out["loss_r1"] == pytest.approx(9.0 / (n * 4), rel=1e-5)


def _sync_worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from bone3d.engines.unpaired import GradientSync

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=2)  # fmt: skip
    torch.manual_seed(rank)  # each rank starts from other weights
    m = torch.nn.Linear(3, 2)
    sync = GradientSync()
    sync.broadcast(m)
    m(torch.full((4, 3), float(rank + 1))).sum().backward()  # dL/dW = 4 (rank + 1) everywhere
    sync.average(m)
    torch.save({"w": m.weight.detach().clone(), "g": m.weight.grad.clone()},
               f"{folder}/rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def test_gradient_sync_broadcasts_weights_and_averages_gradients(tmp_path):
    """Two gloo ranks: after `GradientSync.broadcast` both hold rank 0's weights; after
    `average`, both hold the mean gradient (4 and 8 -> 6), as DDP would give."""
    import torch.multiprocessing as mp

    mp.start_processes(_sync_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    torch.testing.assert_close(r0["w"], torch.nn.Linear(3, 2).weight.detach())
    torch.testing.assert_close(r1["w"], r0["w"])
    torch.testing.assert_close(r0["g"], torch.full((2, 3), 6.0))
    torch.testing.assert_close(r1["g"], torch.full((2, 3), 6.0))
