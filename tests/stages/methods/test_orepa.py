"""OREPA: the merged kernel is the branch sum, the single-branch initialisation keeps a network's function, the
official one is the official code's; GPD with orepa widens every branch, trains, and exports a plain timm student."""

from __future__ import annotations

import math
from copy import deepcopy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import BATCH, STUDENT
from safetensors.torch import load_file
from torch import nn

from stages.data.replay import StoredViews
from stages.methods import MethodContext, create_method
from stages.methods.gpd import DynamicTeacher, WideOREPAConv2d
from stages.methods.gpd.wide_layers import _Mode, _widen_orepa
from stages.methods.method_settings import check_method_args
from stages.methods.orepa import EXPAND, OREPAConv2d, convert_to_orepa, eligible, merge_orepa
from stages.teachers.extract import stored_plan
from stages.teachers.teacher_sources import CachedTeacher
from stages.training.distill import train
from stages.training.settings import TrainSettings
from stages.training.batch import targets
from storage import Store, UserError

# zero_init_last=False: timm zeroes each residual branch's last BatchNorm, which would hide every 3x3 conv but the first.
RESNET = dict(channels=(8, 16, 32, 64), zero_init_last=False)
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def resnet(seed=0, name="resnet18"):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, **RESNET)


def images(n=8, seed=1, c=3, size=32):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def busy_block(ci=6, co=10, bias=True, seed=0):
    """An OREPA block with every branch active: random vector, residual and bias (the official init zeroes some)."""
    torch.manual_seed(seed)
    block = OREPAConv2d(ci, co, 3, bias=bias)
    with torch.no_grad():
        block.vector.copy_(torch.rand_like(block.vector) + 0.1)
        block.idconv.normal_(0, 0.1)
        block.bias.normal_()
    return block


def branch_by_branch(block: OREPAConv2d, x):
    """The block's output computed as its six branches' own convolutions, each scaled per channel, summed."""
    co, ci, k = block.out_channels, block.in_channels, block.kernel_size
    v = block.vector[:, None, :, None, None]  # (6, 1, O, 1, 1)
    origin = F.conv2d(x, block.origin, padding=1)
    avg = F.avg_pool2d(F.conv2d(x, block.avg_conv[:, :, None, None]), k, stride=1, padding=1, count_include_pad=True)
    prior = F.conv2d(F.conv2d(x, block.prior_conv[:, :, None, None]), block.prior[:, None], padding=1, groups=co)
    kxk = F.conv2d(F.conv2d(x, (block.identity + block.idconv)[:, :, None, None]), block.kxk, padding=1)
    pad = F.conv2d(x, block.pad_kernel, padding=1)
    dw_pw = F.conv2d(F.conv2d(x, block.dw, padding=1, groups=ci), block.pw[:, :, None, None])
    outs = torch.stack([origin, avg, prior, kxk, pad, dw_pw])
    return (v * outs).sum(0) + block.bias[:, None, None]


@pytest.mark.parametrize("training", [True, False])
def test_the_merged_conv_equals_the_branch_sum(training):
    block = busy_block().train(training)
    x = images(4, c=6, size=9)
    with torch.no_grad():
        torch.testing.assert_close(block(x), branch_by_branch(block, x), atol=1e-5, rtol=0)
    # The same in a network (BatchNorm in batch statistics when training): OREPA blocks against their merged convs.
    net = resnet()
    convert_to_orepa(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, OREPAConv2d):
                m.vector.copy_(torch.rand_like(m.vector))
    copy = deepcopy(net)
    merged = merge_orepa(copy).train(training)
    assert merged is copy and not any(isinstance(m, OREPAConv2d) for m in merged.modules())  # merged in place
    with torch.no_grad():
        torch.testing.assert_close(net.train(training)(images()), merged(images()), atol=1e-5, rtol=0)


def test_the_official_initialisation():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    block = OREPAConv2d.from_conv(conv)
    assert torch.equal(block.origin, conv.weight) and block.bias is None  # no bias added: merging gives the same conv
    torch.testing.assert_close(block.vector[:, 0], torch.tensor([0.25, 0.25, 0.0, 0.5, 0.05, 0.5]))
    assert torch.equal(block.vector, block.vector[:, :1].expand(-1, 6))  # per output channel, all alike at first
    assert block.idconv.abs().sum() == 0 and torch.equal(block.identity, torch.eye(4))
    bound = math.sqrt(6 / (4 * EXPAND))  # Kaiming-uniform bound of the pointwise conv: fan-in I x 8
    assert 0.5 * bound < block.pw.abs().max() <= bound and block.dw.shape == (4 * EXPAND, 1, 3, 3)
    h = torch.arange(3) + 0.5
    torch.testing.assert_close(block.prior[0], torch.cos(math.pi * h / 3)[:, None].expand(3, 3))  # along h, frequency 1
    # along w, 4 + 1 - 3
    torch.testing.assert_close(block.prior[4], torch.cos(math.pi * h * 2 / 3)[None, :].expand(3, 3))
    x = images(2, c=4, size=7)
    assert (block(x) - conv(x)).abs().max() > 0.1  # the official init does not keep the conv's function
    single = OREPAConv2d.from_conv(conv, "single")
    torch.testing.assert_close(single.vector[:, 0], torch.tensor([1.0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="official, single"):
        OREPAConv2d(4, 6, init="scratch")


def test_the_single_branch_initialisation_keeps_the_networks_function():
    plain, net = resnet().eval(), resnet().eval()
    paths = convert_to_orepa(net, "single")
    # resnet18: 8 blocks of two 3x3 convs; the first of each of 3 downsampling blocks has stride 2.
    assert len(paths) == 16 - 3 and all(isinstance(net.get_submodule(p), OREPAConv2d) for p in paths)
    assert not eligible(plain.conv1) and not eligible(plain.layer2[0].conv1) and eligible(plain.layer2[0].conv2)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), atol=1e-4, rtol=0)
        official = resnet().eval()
        convert_to_orepa(official)
        assert (official(x) - plain(x)).abs().max() > 1e-2  # the check can fail
    merged = merge_orepa(net)
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), plain.state_dict().values()))


# -- GPD with orepa ------------------------------------------------------------------------------


def test_each_branch_is_widened_so_the_merged_wide_kernel_is_the_students_widened():
    small = busy_block(ci=6, co=10)
    for r_out, r_in in [(2, 2), (1, 2), (2, 1)]:
        wide = _widen_orepa(small, r_out, r_in, noise=0.0)
        assert wide.weight.shape == (10 * r_out, 6 * r_in, 3, 3)
        with torch.no_grad():
            for a in range(r_out):
                for b in range(r_in):  # every block of the wide kernel: the student's / r_out
                    torch.testing.assert_close(
                        wide.weight[a * 10 : (a + 1) * 10, b * 6 : (b + 1) * 6] * r_out, small.weight
                    )
            torch.testing.assert_close(wide.bias * r_out, small.bias.repeat(r_out))
            # The block of the first copies (the 1x1 -> kxk branch's 1x1 times r_in), as the student takes it: at
            # initialisation the corner of the merged wide kernel.
            torch.testing.assert_close(wide.merged(10, 6, inner_scale=r_in), wide.weight[:10, :6])


def _wide_block(small: OREPAConv2d, r_out: int, r_in: int) -> tuple[WideOREPAConv2d, _Mode]:
    """The widened block of ``small`` (noise 0), as the dynamic teacher builds it, and the switch to its student."""
    mode = _Mode()
    conv = nn.Conv2d(small.in_channels, small.out_channels, 3, padding=1, bias=small.bias is not None)
    wide = WideOREPAConv2d(conv, mode, 2, first=r_in == 1, last=r_out == 1, noise=0.0, init="official")
    wide.branches = _widen_orepa(small, r_out, r_in, noise=0.0)  # every branch busy, not the official init's zeros
    return wide, mode


@pytest.mark.parametrize("r_out, r_in", [(2, 2), (1, 2), (2, 1)])
def test_the_students_gradient_lands_on_the_first_copy_as_the_official_widening_puts_it(r_out, r_in):
    """The official student (DynamicOREPA's active_* tensors) takes the first copy of every tensor, times the ratio
    its copies were divided by: its gradient G on a tensor lands there times that ratio, nothing on the other copies.
    The ratio is r_out for the kernels and the bias, r_in for the 1x1 of 1x1 -> kxk, 1 for dw and vector."""
    ci, co = 4, 6
    small = busy_block(ci, co)
    wide, mode = _wide_block(small, r_out, r_in)
    x, g = images(2, c=ci, size=7), torch.randn(2, co, 7, 7, generator=torch.Generator().manual_seed(3))
    (F.conv2d(x, small.weight, small.bias, padding=1) * g).sum().backward()  # G: the plain student's own gradients
    mode.student = True
    (wide(x) * g).sum().backward()
    ratio = dict(
        origin=r_out,
        avg_conv=r_out,
        prior_conv=r_out,
        idconv=r_in,
        kxk=r_out,
        pad_kernel=r_out,
        dw=1,
        pw=r_out,
        vector=1,
        bias=r_out,
    )
    assert set(ratio) == {n for n, _ in small.named_parameters()}
    for name, p in small.named_parameters():
        expected = torch.zeros_like(getattr(wide.branches, name))
        expected[tuple(slice(n) for n in p.shape)] = ratio[name] * p.grad  # the first copy: the top-left corner
        torch.testing.assert_close(getattr(wide.branches, name).grad, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_the_1x1_kxk_gradients_are_the_official_layouts():
    """One GPD step's two passes (the dynamic teacher, then the student inside it) against the official layout of
    the 1x1 -> kxk branch built by hand (init_expand_orepa: r row copies / r, then r column copies) and differentiated:
    the student's gradient r G sits on the first copy (issue 35, item 9; this project had G on each copy)."""
    r, ci, co = 2, 4, 6
    small = busy_block(ci, co)
    wide, mode = _wide_block(small, r, r)
    gen = torch.Generator().manual_seed(3)
    x, xs = images(2, c=r * ci, size=7), images(2, seed=2, c=ci, size=7)
    g, gs = torch.randn(2, r * co, 7, 7, generator=gen), torch.randn(2, co, 7, 7, generator=gen)  # linear losses
    loss = (wide(x) * g).sum()
    mode.student = True
    (loss + (wide(xs) * gs).sum()).backward()

    s = {n: t.detach() for n, t in small.state_dict().items()}
    identity = (s["identity"] / r).repeat(r, r)
    idconv = (s["idconv"] / r).repeat(r, r).requires_grad_()
    kxk = (s["kxk"] / r).repeat(r, r, 1, 1).requires_grad_()
    v3 = s["vector"][3].repeat(r)

    def branch(conv1, conv2, v):  # the official weight_gen's 1x1_kxk branch: conv2 after conv1, scaled per channel
        return v[:, None, None, None] * torch.einsum("ti,othw->oihw", conv1, conv2)

    wide_kernel = branch(identity + idconv, kxk, v3)
    # The official student (active_weight_gen): the corners, the 1x1 (idconv and id_tensor) times r, conv2 times r.
    student_kernel = branch((identity[:ci, :ci] + idconv[:ci, :ci]) * r, kxk[:co, :ci] * r, v3[:co])
    ((F.conv2d(x, wide_kernel, padding=1) * g).sum() + (F.conv2d(xs, student_kernel, padding=1) * gs).sum()).backward()
    torch.testing.assert_close(wide.branches.idconv.grad, idconv.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide.branches.kxk.grad, kxk.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["official", "single"])
def test_the_dynamic_teacher_with_orepa_computes_its_students_function_at_initialisation(init):
    plain = resnet().eval()
    dynamic = DynamicTeacher(resnet(), r=2, noise=0.0, orepa=init).eval()
    wide_convs = [m for m in dynamic.net.modules() if isinstance(m, WideOREPAConv2d)]
    # 64 -> 8 widened to 128 -> 16
    assert len(wide_convs) == 13 and wide_convs[0].branches.weight.shape == (16, 128, 3, 3)
    exported = dynamic.export().eval()
    x = images()
    with torch.no_grad():
        # the dynamic teacher is the student
        torch.testing.assert_close(dynamic.wide(x), exported(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(dynamic(x), exported(x), atol=1e-5, rtol=0)
        gap = (exported(x) - plain(x)).abs().max()
    if init == "single":  # kept from the student it was built from
        assert gap < 1e-4
    else:  # as the official code: the student's 3x3 convs take the OREPA init's merged kernels
        assert gap > 1e-2


def _method(**kwargs):
    return create_method("gpd", MethodContext(num_classes=10, student_dim=64, teacher_dim=None), **kwargs)


def test_gpd_with_orepa_trains_and_exports_a_plain_timm_student():
    method = _method(orepa=True)
    dynamic = method.wrap_student(resnet())
    opt = torch.optim.SGD(dynamic.parameters(), lr=0.05, momentum=0.9)
    vector = dynamic.net.layer1[0].conv1.branches.vector
    before = vector.detach().clone()
    y = targets(np.arange(16) % 10, 10, 0.0)
    for step in range(3):
        loss, parts = method(method.student_outputs(dynamic, images(16, seed=step)), {}, y)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(vector, before)  # the branch factors train
    exported = method.export_student(dynamic)
    assert not any(isinstance(m, (OREPAConv2d, WideOREPAConv2d)) for m in exported.modules())
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10, **RESNET)
    assert exported.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(exported.state_dict())  # strict: the same shapes
    w = dynamic.net.layer1[0].conv1
    # The merged block of the branches' first copies, times r (after training no longer the wide kernel's corner).
    torch.testing.assert_close(exported.layer1[0].conv1.weight, w.branches.merged(8, 64, inner_scale=2).detach() * 2)
    dynamic.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images()), dynamic(images()), atol=1e-5, rtol=0)


def test_gpd_with_orepa_trains_from_a_store(base_store, train_data, tmp_path):
    store = Store(base_store)
    plan = stored_plan(store)
    settings = TrainSettings(
        **STUDENT,
        method="gpd",
        method_args={"orepa": True},
        epochs=1,
        batch_size=BATCH,
        size=32,
        clip_grad=5.0,
        model_ema=0.9,
    )
    result = train(
        settings,
        train_data,
        None,
        StoredViews(store, plan),
        plan,
        CachedTeacher(store, "t1", ("logits",)),
        out_dir=tmp_path,
    )
    assert all(np.isfinite(v) for v in result.metrics[0].values())
    assert any(isinstance(m, WideOREPAConv2d) for m in result.model.modules())
    plain = timm.create_model(STUDENT["student"], pretrained=False, num_classes=10, **STUDENT["student_kwargs"])
    plain.load_state_dict(load_file(tmp_path / "student.safetensors"))  # strict, no GPD or OREPA code
    plain.load_state_dict(load_file(tmp_path / "ema" / "model.safetensors"))  # the EMA's student too


def test_a_student_without_3x3_stride_1_convs_is_refused_in_one_line():
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT)
    with pytest.raises(UserError, match="orepa") as e:
        _method(orepa=True).wrap_student(vit)
    assert "\n" not in str(e.value) and "set orepa false" in str(e.value)
    _method(orepa=False).wrap_student(vit)  # without it, the ViT is a GPD student
    with pytest.raises(UserError, match="orepa_init must be one of official, single"):
        _method(orepa=True, orepa_init="scratch")
    with pytest.raises(UserError, match="orepa"):
        check_method_args(type(_method()), {"orepa": "yes"}, "test")


def test_the_checkpoint_state_round_trips():
    a = DynamicTeacher(resnet(seed=0), orepa="official")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = a.state_dict()
    assert "net.layer1.0.conv1.branches.vector" in state and "net.layer1.0.conv1.branches.prior" in state
    b = DynamicTeacher(resnet(seed=3), orepa="official")  # another draw of every branch
    b.load_state_dict(state)  # strict
    a.eval(), b.eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(a.wide(x), b.wide(x)) and torch.equal(a(x), b(x))
    assert all(torch.equal(u, v) for u, v in zip(a.export().state_dict().values(), b.export().state_dict().values()))


def test_a_student_from_trained_weights_keeps_its_function_by_default():
    """As the official train_dkd.py: the single-branch initialisation when the student starts from weights, the official one otherwise."""
    trained = create_method(
        "gpd", MethodContext(num_classes=10, student_dim=64, teacher_dim=None, student_trained=True), orepa=True
    )
    assert (trained.orepa, _method(orepa=True).orepa) == ("single", "official")
    student = resnet().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dynamic = trained.wrap_student(student).eval()
    torch.testing.assert_close(dynamic(x), student(x), atol=1e-4, rtol=1e-4)
