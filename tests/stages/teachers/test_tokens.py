"""Tokens and the int8 feature mode: quantisation bounds and fidelity, token layout, store = live teacher, the cost line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.fidelity import cosine_fidelity
from conftest import BATCH, BLOCK, DATA, make_record, runner_for
from pipeline.cli import main
from stages.cache import teacher_rows
from stages.teachers.extract import TeacherRunner, extract, teacher_info
from stages.cache.store_setup import open_store, stored_plan
from stages.data.replay import StoredViews
from stages.teachers.teachers import build_teacher
from stages.data.views import normalize, row
from storage import Store, TeacherRecord, UnitArrays, UserError

NEEDS = ("features", "tokens")


def gaussian(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _info(feature_dtype=None, dtype="float16", D=384, T=257, outputs=("features", "tokens")) -> TeacherRecord:
    info = dict(
        outputs=outputs,
        num_classes=0,
        feature_dim=D,
        logits="topk",
        k=0,
        dtype=dtype,
        feature_dtype=feature_dtype or dtype,
    )
    return (
        make_record(**info, num_tokens=T, token_dim=D, token_prefix=1) if "tokens" in outputs else make_record(**info)
    )


# -- quantisation -------------------------------------------------------------------------


def test_int8_round_trip_stays_within_half_a_step_with_cosine_above_0999():
    x = gaussian(4096, 384)  # (N, D), like DINOv2-S pooled features
    q, scale = teacher_rows.quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (4096,)
    assert torch.equal(q.abs().amax(1), torch.full((4096,), 127, dtype=torch.int8))  # every row uses the full range
    back = teacher_rows.dequantize(q, scale)
    assert ((back - x).abs() <= 0.5001 * scale[:, None]).all()  # round to nearest: at most half a step
    fidelity = cosine_fidelity(x, back)
    assert fidelity["min"] >= 0.999 and fidelity["mean"] >= 0.9999, fidelity
    # About one byte per dimension, the float32 scale included.
    specs = teacher_rows.array_specs(_info("int8", outputs=("features",)))
    stored = sum(int(np.prod(s.row_shape)) * np.dtype(s.dtype).itemsize for s in specs.values())
    assert stored / 384 == pytest.approx(388 / 384)


def test_cosine_fidelity_tells_good_from_bad():
    x = gaussian(512, 384)
    assert cosine_fidelity(x, x)["min"] == pytest.approx(1.0)
    assert cosine_fidelity(x, -x)["mean"] == pytest.approx(-1.0)
    # 4-bit steps (max|x| / 7) are too coarse: the threshold the int8 mode meets is not vacuous.
    scale = x.abs().amax(1, keepdim=True) / 7
    assert cosine_fidelity(x, (x / scale).round() * scale)["mean"] < 0.999


def test_zero_vectors_and_tokens_quantise_per_vector():
    x = gaussian(3, 5, 16)  # (B, T, D)
    x[1, 2] = 0  # e.g. a dead ReLU position
    x[2] *= torch.logspace(-3, 3, 5).view(5, 1)  # tokens of very different norms each keep their precision
    q, scale = teacher_rows.quantize(x)
    assert q.shape == (3, 5, 16) and scale.shape == (3, 5) and scale[1, 2] == 0
    back = teacher_rows.dequantize(q, scale)
    assert torch.equal(back[1, 2], torch.zeros(16)) and torch.isfinite(back).all()
    assert ((back - x).abs() <= 0.5001 * scale.unsqueeze(-1)).all()


# -- specs, names, store round trips ---------------------------------------------------------


def test_int8_arrays_and_names_carry_their_scales():
    info = _info("int8")
    specs = teacher_rows.array_specs(info)
    assert {k: (s.row_shape, s.dtype) for k, s in specs.items()} == {
        "features": ((384,), "int8"),
        "features_scale": ((), "float32"),
        "tokens": ((257, 384), "int8"),
        "tokens_scale": ((257,), "float32"),
    }
    assert teacher_rows.stored_names(info, ("tokens",)) == ["tokens", "tokens_scale"]
    assert teacher_rows.stored_names(_info("float16"), NEEDS) == ["features", "tokens"]


def test_teacher_json_without_feature_dtype_is_refused():
    written = _info(dtype="float32", outputs=("features",)).replace(views=1).to_dict()
    assert TeacherRecord.from_dict(written).feature_dtype == "float32"
    del written["feature_dtype"]  # as written before --feature-dtype existed: no default any more
    with pytest.raises(ValueError, match="lacks feature_dtype"):
        TeacherRecord.from_dict(written)


@pytest.mark.parametrize("fdtype", ["float32", "float16", "int8"])
def test_tokens_round_trip_through_a_real_store(tmp_path, fdtype):
    info = _info(fdtype, D=24, T=5)
    out = {"features": gaussian(8, 24, seed=1), "tokens": gaussian(8, 5, 24, seed=2)}
    group = UnitArrays.create(tmp_path / "t", teacher_rows.array_specs(info), num_views=1, num_samples=8, block=8)
    group.write_unit(0, 0, teacher_rows.encode(out, torch.zeros(8), info))
    assert group.array("tokens").shape == (1, 8, 5, 24) and str(group.array("tokens").dtype) == fdtype
    back = teacher_rows.decode(group.read_unit(0, 0, teacher_rows.stored_names(info, NEEDS)), info, NEEDS)
    for key, x in out.items():
        assert back[key].dtype == torch.float32 and back[key].shape == x.shape
        expected = {"float32": x, "float16": x.half().float()}.get(fdtype)
        assert torch.equal(
            back[key], expected if expected is not None else teacher_rows.dequantize(*teacher_rows.quantize(x))
        )


def test_storage_line_counts_every_array():
    info = _info("int8", D=384, T=257, outputs=("features", "tokens"))
    sizes = teacher_rows.storage_bytes(info, 1000, 2)
    assert sizes == {"features": 2000 * (384 + 4), "tokens": 2000 * 257 * (384 + 4)}
    line = teacher_rows.storage_line("dinov2_s", info, 1_281_167, 50)
    # 1.28M x 50 x 257 x 388 B
    assert line.startswith("store will hold about 5.8 TiB") and "(tokens 5.8 TiB, features 23.1 GiB;" in line
    assert "1,281,167 samples × 50 views" in line


# -- teachers: token layout -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    """DINOv2-S with 4 register tokens at 28 px: 2x2 patches, CLS and registers in front."""
    return build_teacher("dinov2_s_reg", random_init=True, num_classes=10, input_size=28)


@pytest.fixture(scope="module")
def cnn():
    return build_teacher("resnet10t", random_init=True, num_classes=10, input_size=64)  # 2x2 final feature map


def test_vit_tokens_are_cls_then_patches_without_registers(vit):
    x = gaussian(16, 3, 28, 28)
    assert set(vit(x)) == {"features"}  # the default path computes no tokens
    out = vit(x, outputs=("features", "tokens"))
    f = vit.model.forward_features(x)  # (B, 1 + 4 + 4, D): CLS, registers, patches
    assert vit.model.num_prefix_tokens == 5 and f.shape[1] == 9
    assert torch.equal(out["tokens"], torch.cat([f[:, :1], f[:, 5:]], 1))
    assert vit.token_shape == (5, 384) and vit.token_prefix == 1 and "tokens" in vit.outputs


def test_cnn_tokens_are_feature_map_positions(cnn):
    x = gaussian(16, 3, 64, 64)
    out = cnn(x, outputs=("logits", "features", "tokens"))
    f = cnn.model.forward_features(x)  # (B, C, 2, 2)
    assert out["tokens"].shape == (16, 4, 512) and torch.equal(out["tokens"][:, 1], f[:, :, 0, 1])
    assert cnn.token_shape == (4, 512) and cnn.token_prefix == 0
    assert torch.equal(out["logits"], cnn(x)["logits"])


# -- extraction: the store against the live teacher ---------------------------------------------


def _live(store: Store, data, plan, teacher, block: int = 1) -> dict[str, torch.Tensor]:
    """The teacher run now on the stored views of (view 0, ``block``): 32 rows, the same batch as extraction."""
    views = StoredViews(store, stored_plan(store))
    params, ids = views.params(0, block), views.ids(block)
    images = torch.stack(
        [plan.render(data.image(int(i)), row(params, j), teacher.input_size) for j, i in enumerate(ids)]
    )
    return teacher(normalize(images, teacher.mean, teacher.std), outputs=teacher.outputs)


@pytest.mark.parametrize("fdtype", ["float32", "float16", "int8"])
def test_vit_tokens_in_the_store_are_the_live_teachers(tmp_path, train_data, plan, vit, fdtype):
    store = open_store(tmp_path / "store", train_data, plan, views=1, block=BLOCK, size=vit.input_size)
    info = teacher_info(vit, teacher_rows.output_info(vit, outputs=NEEDS, dtype="float32", feature_dtype=fdtype))
    extract(store, train_data, TeacherRunner(vit, info), "t", views=1, batch_size=BATCH)
    made = store.teacher_info("t")
    assert (made.feature_dtype, made.num_tokens, made.token_dim, made.token_prefix) == (fdtype, 5, 384, 1)
    group = store.teacher("t")
    assert group.array("tokens").shape == (1, 80, 5, 384) and str(group.array("tokens").dtype) == fdtype
    assert ("tokens_scale" in group.names) == (fdtype == "int8")
    stored = teacher_rows.decode(group.read_unit(0, 1, teacher_rows.stored_names(made, NEEDS)), made, NEEDS)
    live = _live(store, train_data, plan, vit)
    for key in NEEDS:
        assert stored[key].dtype == torch.float32 and stored[key].shape == live[key].shape
        if fdtype == "float32":
            assert torch.equal(stored[key], live[key])
        elif fdtype == "float16":
            assert torch.equal(stored[key], live[key].half().float())
        else:
            q, scale = teacher_rows.quantize(live[key])
            assert torch.equal(stored[key], teacher_rows.dequantize(q, scale))
            assert ((stored[key] - live[key]).abs() <= 0.5001 * scale.unsqueeze(-1)).all()
            assert cosine_fidelity(live[key], stored[key])["min"] >= 0.999


def test_extract_command_stores_int8_tokens_and_logs_the_cost_first(tmp_path, capsys, train_data, plan, cnn):
    path = tmp_path / "store"
    argv = [
        "extract",
        "--data",
        DATA,
        "--teacher",
        "resnet10t",
        "--random-init",
        "--size",
        "64",
        "--views",
        "1",
        "--block",
        str(BLOCK),
    ]
    argv += [
        "--batch-size",
        str(BATCH),
        "--outputs",
        "logits,features,tokens",
        "--feature-dtype",
        "int8",
        "--store",
        str(path),
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    made = json.loads((path / "teachers" / "resnet10t" / "teacher.json").read_text())
    assert (
        made["outputs"] == ["logits", "features", "tokens"]
        and made["feature_dtype"] == "int8"
        and made["dtype"] == "float16"
    )
    made = TeacherRecord.from_dict(made)
    line = teacher_rows.storage_line("resnet10t", made, 80, 1)
    assert line in err and "tokens 161.2 KiB" in line  # 80 x 4 x (512 + 4) bytes
    assert err.index(line) < err.index("extract resnet10t")  # before any work
    store = Store(path)
    group = store.teacher("resnet10t")
    assert group.array("tokens").shape == (1, 80, 4, 512) and group.array("tokens_scale").shape == (1, 80, 4)
    needs = ("logits", "features", "tokens")
    stored = teacher_rows.decode(group.read_unit(0, 1, teacher_rows.stored_names(made, needs)), made, needs)
    live = _live(store, train_data, plan, cnn)
    for key in ("features", "tokens"):
        assert torch.equal(stored[key], teacher_rows.dequantize(*teacher_rows.quantize(live[key])))
    assert torch.equal(stored["logits"].argmax(1), live["logits"].argmax(1))


def test_a_teacher_without_feature_dtype_is_refused_and_one_with_it_resumes(store_copy, train_data, plan, teacher1):
    store = open_store(store_copy, train_data, plan, views=2, block=BLOCK, size=32)
    result = extract(
        store, train_data, runner_for(teacher1, logits="full", dtype="float32"), "t1", views=2, batch_size=BATCH
    )
    assert result.units == 0 and result.skipped == 6
    with pytest.raises(UserError, match="feature_dtype"):
        extract(
            store, train_data, runner_for(teacher1, logits="full", dtype="float32", feature_dtype="int8"), "t1", views=2
        )
    path = store_copy / "teachers" / "t1" / "teacher.json"
    old = json.loads(path.read_text())
    del old["feature_dtype"]  # as written before --feature-dtype existed
    path.write_text(json.dumps(old))
    with pytest.raises(
        UserError, match="cannot read .*teacher.json: teacher.json lacks feature_dtype; .*extract it again"
    ):
        extract(
            store, train_data, runner_for(teacher1, logits="full", dtype="float32"), "t1", views=2, batch_size=BATCH
        )
