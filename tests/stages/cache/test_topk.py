"""Top-k rows that keep the teacher's tail: exact tail mass, no clamped rows, the stored target for DKD, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.cache import teacher_rows
from stages.cache import topk
from stages.methods.losses import dist_loss, dkd_loss, kd_loss

from benchmarks.fidelity import gradient_cosine, old_tail_clamped
from conftest import make_record

C, K, B = 1000, 10, 512


# -- measures of a rebuild against the full logits (tests and benchmarks/store.py, not the product) ----------


def topk_rebuilt(
    logits: torch.Tensor, k: int, target: torch.Tensor, dtype: str = "float16", temperature: float = 1.0
) -> torch.Tensor:
    """``logits`` (B, C) after a round trip through a top-``k`` store in ``dtype``: what a student would be given."""
    rows = topk.TopK.of(logits, k, target).rows(dtype, "int32")
    return topk.logits_from_topk(rows, logits.shape[1], temperature)


def imagenet_like_logits(rows: int = B, scale: float = 20.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (rows, C), labels): a confident teacher whose confusions fall on nearby classes.

    ``scale`` 20 gives a median top-1 probability of about 0.93 (benchmarks/store.py's 'confident' teacher).
    """
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((C, 32))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    labels = rng.integers(0, C, rows)
    f = protos[labels] + 0.8 * rng.standard_normal((rows, 32)) / np.sqrt(32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    logits = scale * f @ protos.T + rng.standard_normal((rows, C))
    return torch.from_numpy(logits).float(), torch.from_numpy(labels)


def true_tail(logits: torch.Tensor, k: int = K) -> torch.Tensor:
    """(B,) float64 probability mass outside the top k."""
    p = torch.softmax(logits.double(), 1)
    return 1.0 - p.topk(k, 1).values.sum(1)


def test_tail_mass_is_exact_to_float16_precision():
    logits, labels = imagenet_like_logits()
    rows = topk.TopK.of(logits, K, labels).rows("float16", "int16")
    # Stored: the float16 nearest the exact log tail mass (1 ulp for the float32 -> float64 path).
    exact = torch.log(true_tail(logits)).numpy()
    ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(rows["tail"][:, 0].astype(np.float64) - exact) <= ulp)
    # Rebuilt: the softmax puts that mass outside the top k, to float16's relative precision.
    rebuilt = torch.softmax(topk.logits_from_topk(rows, C).double(), 1)
    kept = torch.zeros(B, C, dtype=torch.bool).scatter_(1, torch.from_numpy(rows["topk_index"][:, :K]).long(), True)
    mass = rebuilt.masked_fill(kept, 0.0).sum(1)
    rel = ((mass - true_tail(logits)) / true_tail(logits)).abs()
    assert float(rel.max()) < 4e-3 and float(rel.median()) < 1e-3


def test_no_tail_is_clamped_where_the_true_tail_exceeds_1e_4():
    logits, labels = imagenet_like_logits(scale=24.0)  # confident: many small tails
    tail = true_tail(logits)
    real = tail > 1e-4
    assert real.sum() > 100
    # The old encoding (float16 logits, tail = 1 - sum) clamped a share of exactly these rows.
    assert old_tail_clamped(logits, K)[real].float().mean() > 0.05
    rows = topk.TopK.of(logits, K, labels).rows("float16", "int16")
    rebuilt = torch.softmax(topk.logits_from_topk(rows, C).double(), 1)
    kept = torch.zeros(B, C, dtype=torch.bool).scatter_(1, torch.from_numpy(rows["topk_index"][:, :K]).long(), True)
    mass = rebuilt.masked_fill(kept, 0.0).sum(1)
    assert torch.all((mass[real] / tail[real] - 1).abs() < 4e-3)
    # Even tiny tails keep their size rather than a floor.
    assert torch.all((mass / tail - 1).abs() < 1e-2)


def test_dkd_uses_the_stored_target_where_it_is_outside_the_top_k():
    logits, _ = imagenet_like_logits(rows=64)
    # Targets ranked 50th by the teacher: never in the top 10.
    target = logits.argsort(1, descending=True)[:, 50]
    student = torch.randn(64, C, generator=torch.Generator().manual_seed(1))
    rows = topk.TopK.of(logits, K, target).rows("float16", "int16")
    rebuilt = topk.logits_from_topk(rows, C)
    torch.testing.assert_close(
        torch.log_softmax(rebuilt.double(), 1)[torch.arange(64), target],
        torch.log_softmax(logits.double(), 1)[torch.arange(64), target],
        rtol=0,
        atol=4e-3,
    )
    # TCKD (the binary target / non-target split) is then exact to float16 precision...
    tckd = [dkd_loss(student, t, target, alpha=1.0, beta=0.0) for t in (logits, rebuilt)]
    assert float(tckd[1]) == pytest.approx(float(tckd[0]), rel=2e-3)
    # ...where a rebuild that spread the target with the rest of the tail is far off.
    blind = {k: v.copy() for k, v in rows.items()}
    blind["topk_index"][:, -1], blind["topk_logp"][:, -1] = blind["topk_index"][:, 0], blind["topk_logp"][:, 0]
    uniform = dkd_loss(student, topk.logits_from_topk(blind, C), target, alpha=1.0, beta=0.0)
    assert abs(float(uniform) - float(tckd[0])) > 10 * abs(float(tckd[1]) - float(tckd[0]))
    assert gradient_cosine(lambda s, t: dkd_loss(s, t, target), student, logits, rebuilt) >= 0.99


@pytest.mark.parametrize("scale", [16.0, 20.0])
def test_gradients_from_the_rebuild_follow_the_full_logits_at_t1(scale):
    logits, labels = imagenet_like_logits(scale=scale)
    rebuilt = topk_rebuilt(logits, K, labels, "float16")
    g = torch.Generator().manual_seed(2)
    for student in (torch.randn(B, C, generator=g), 0.5 * logits + torch.randn(B, C, generator=g)):
        assert gradient_cosine(lambda s, t: kd_loss(s, t, 1.0), student, logits, rebuilt) >= 0.99
        assert gradient_cosine(lambda s, t: dkd_loss(s, t, labels, 1.0, 2.0, 1.0), student, logits, rebuilt) >= 0.99
        # DIST correlates each class's probabilities across the batch: an even tail flattens that (0.97 here).
        assert gradient_cosine(lambda s, t: dist_loss(s, t), student, logits, rebuilt) >= 0.95


def test_the_tail_is_rebuilt_for_the_methods_temperature():
    # A Gaussian tail: the model behind ``rest_logp`` is then right, and a uniform tail overstates the softened mass.
    g = torch.Generator().manual_seed(3)
    logits = 2.5 * torch.randn(B, C, generator=g)
    logits[:, :K] += 20.0
    labels = torch.zeros(B, dtype=torch.long)
    rows = topk.TopK.of(logits, K, labels).rows("float16", "int16")

    def soft_tail(z, T):
        return torch.softmax(z.double() / T, 1)[:, K:].sum(1)

    T = 4.0
    exact = soft_tail(logits, T)
    tuned = soft_tail(topk.logits_from_topk(rows, C, T), T)
    uniform = soft_tail(topk.logits_from_topk(rows, C, 1.0), T)
    assert float(((tuned - exact) / exact).abs().median()) < 0.02  # measured 0.007
    assert float(((uniform - exact) / exact).median()) > 0.2  # measured 0.34
    # So the KL at T = 4 falls, and the stored statistics estimate it (KL to a uniform tail under a Gaussian).
    kl_tuned, kl_uniform = (
        topk.kl(logits, topk.logits_from_topk(rows, C, T), T),
        topk.kl(logits, topk.logits_from_topk(rows, C, 1.0), T),
    )
    assert float(kl_tuned.mean()) < 0.8 * float(kl_uniform.mean())  # measured 0.079 and 0.119 nats
    estimate = topk.TopK.from_rows(rows).tail_kl(C, T)
    assert float(estimate.mean()) == pytest.approx(float(kl_tuned.mean()), rel=0.2)


def test_decode_rebuilds_for_the_temperature_it_is_given():
    logits, labels = imagenet_like_logits(rows=32)
    info = make_record(outputs=("logits",), num_classes=C, feature_dim=4, k=K, dtype="float16")
    rows = teacher_rows.encode({"logits": logits}, labels, info)
    at1 = teacher_rows.decode(rows, info, ["logits"])["logits"]
    at4 = teacher_rows.decode(rows, info, ["logits"], temperature=4.0)["logits"]
    kept = torch.zeros(32, C, dtype=torch.bool).scatter_(1, torch.from_numpy(rows["topk_index"]).long(), True)
    kept[torch.arange(32), labels] = True
    assert torch.equal(at1[kept], at4[kept])  # the stored classes are the same at any temperature
    assert torch.all(at4[~kept] < at1[~kept])  # the tail's softened mass is smaller than a uniform tail's


def test_a_row_whose_classes_are_all_kept_has_no_tail():
    logits = torch.tensor([[3.0, 1.0, -2.0]])
    rows = topk.TopK.of(logits, 3, torch.tensor([2])).rows("float32", "int16")
    assert np.isneginf(rows["tail"][0, 0])
    torch.testing.assert_close(topk.logits_from_topk(rows, 3, 4.0), logits, rtol=0, atol=1e-6)


def _rebuilt_in_float64(rows: dict, num_classes: int, temperature: float) -> torch.Tensor:
    """The rebuild written out plainly: a float64 (B, C) matrix of log-probabilities, plus the log-sum-exp, to float32."""
    t = topk.TopK.from_rows(rows)
    full = torch.empty(len(t.logsumexp), num_classes, dtype=torch.float64)
    if num_classes > t.topk_index.shape[1]:
        full[:] = t.rest_logp(num_classes, temperature)[:, None]
        out = t.target_in_tail(num_classes).nonzero().flatten()
        full[out, t.target_index[out]] = t.target_logp[out]
    full.scatter_(1, t.topk_index, t.topk_logp)
    return (full + t.logsumexp[:, None]).float()


@pytest.mark.parametrize("classes, k", [(C, K), (10, 3), (3, 3)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_the_rebuild_equals_the_float64_construction_bit_for_bit(classes, k, temperature):
    """The decoder fills float32 and places each value once; every logit must still be float32(logp + lse) in float64."""
    g = torch.Generator().manual_seed(classes + k)
    logits = torch.randn(256, classes, generator=g) * 6
    inside = logits.argmax(1)  # every target inside the top k: the short path
    outside = torch.randint(0, classes, (256,), generator=g)  # many outside
    for target in (inside, outside):
        for dtype in ("float16", "float32"):
            rows = topk.TopK.of(logits, k, target).rows(dtype, "int16")
            got, expected = (
                topk.logits_from_topk(rows, classes, temperature),
                _rebuilt_in_float64(rows, classes, temperature),
            )
            assert got.dtype == torch.float32 and got.numpy().tobytes() == expected.numpy().tobytes()
