"""The agglomerative objective's parts against independent references: torch's F.interpolate and
jax.image.resize (grids), PyTorch transcriptions of RADIO's adaptor MLPs and of the whole loss
(F.cosine_similarity, F.smooth_l1_loss, UNIC's aggregation), numpy references of PHI-S and of the
running standardization, and the statistics of teacher dropping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from dmt_jax.objective import agglomerative as agg
from dmt_jax.objective import align, dropping, hadamard, heads, normalize

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _t(x):
    return torch.from_numpy(np.array(x, np.float32))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


# ---------------------------------------------------------------- grids


GRIDS = [((14, 14), (16, 16)), ((16, 16), (14, 14)), ((16, 16), (64, 64)), ((64, 64), (16, 16)),
         ((14, 14), (64, 64)), ((64, 64), (14, 14)), ((14, 16), (64, 48)), ((7, 5), (3, 9))]  # fmt: skip


@pytest.mark.parametrize("src,dst", GRIDS)
def test_resample_matches_torch_and_jax_image_resize(src, dst):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, src[0] * src[1], 6)).astype(np.float32)
    ours = np.asarray(align.resample(jnp.asarray(x), src, dst))
    assert ours.shape == (2, dst[0] * dst[1], 6)
    nchw = _t(x).reshape(2, *src, 6).permute(0, 3, 1, 2)
    ref = F.interpolate(nchw, size=dst, mode="bilinear", align_corners=False, antialias=False)
    ref = ref.permute(0, 2, 3, 1).reshape(2, -1, 6).numpy()
    assert rel_err(ours, ref) < 1e-5
    jax_ref = jax.image.resize(jnp.asarray(x).reshape(2, *src, 6), (2, *dst, 6), "bilinear", antialias=False)
    assert rel_err(ours, np.asarray(jax_ref).reshape(2, -1, 6)) < 1e-5


def test_resample_identity_and_gradient():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16, 3)), jnp.float32)
    assert align.resample(x, 4, 4) is x
    # The adjoint: d/dx <resample(x), y> = resample^T y, which torch's autograd gives too.
    y = np.random.default_rng(2).standard_normal((1, 49, 3)).astype(np.float32)
    g = jax.grad(lambda a: (align.resample(a, 4, 7) * y).sum())(x)
    xt = _t(x).reshape(1, 4, 4, 3).permute(0, 3, 1, 2).requires_grad_()
    out = F.interpolate(xt, size=(7, 7), mode="bilinear", align_corners=False)
    (out.permute(0, 2, 3, 1).reshape(1, 49, 3) * _t(y)).sum().backward()
    assert rel_err(g, xt.grad.permute(0, 2, 3, 1).reshape(1, 16, 3).numpy()) < 1e-5


# ---------------------------------------------------------------- heads: PyTorch transcriptions


class TorchMLP(nn.Module):
    """NVlabs/RADIO radio/adaptor_mlp.py `MLP` (v1), transcribed."""

    def __init__(self, input_size, hidden_size, output_size, num_inner=0):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.relu = nn.ReLU()
        inner = []
        for _ in range(num_inner):
            inner.extend([nn.Linear(hidden_size, hidden_size), nn.LayerNorm(hidden_size), nn.ReLU()])
        self.inner = nn.Sequential(*inner) if inner else nn.Identity()
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.fc2(self.inner(self.relu(self.norm(self.fc1(x)))))


class TorchMLP2(nn.Module):
    """NVlabs/RADIO radio/adaptor_mlp.py `MLP2` (v2, no pre_norm, no upsampling), transcribed."""

    def __init__(self, input_size, hidden_size, output_size, num_inner=0):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.LayerNorm(hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
                for _ in range(num_inner)
            ]  # fmt: skip
        )
        self.final = nn.Sequential(nn.LayerNorm(hidden_size), nn.GELU(), nn.Linear(hidden_size, output_size))

    def forward(self, x):
        x = self.fc1(x)
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


class TorchDMTHead(nn.Module):
    """DMT's heads (linear | ln_linear | mlp), as METHOD.md 6 describes them."""

    def __init__(self, kind, input_size, output_size, mlp_ratio=4.0):
        super().__init__()
        self.kind = kind
        if kind != "linear":
            self.norm = nn.LayerNorm(input_size, eps=1e-6)
        if kind == "mlp":
            self.fc1 = nn.Linear(input_size, int(input_size * mlp_ratio))
        self.out = nn.Linear(int(input_size * mlp_ratio) if kind == "mlp" else input_size, output_size)

    def forward(self, x):
        if self.kind != "linear":
            x = self.norm(x)
        if self.kind == "mlp":
            x = F.gelu(self.fc1(x))
        return self.out(x)


def torch_head(kind, d_in, hidden, d_out, num_inner):
    if kind == "mlp_v1":
        return TorchMLP(d_in, hidden, d_out, num_inner)
    if kind == "mlp_v2":
        return TorchMLP2(d_in, hidden, d_out, num_inner)
    return TorchDMTHead(kind, d_in, d_out)


def randomized(params, seed):
    """Random values everywhere (LayerNorm scales and biases too): defaults hide swapped tensors."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(np.float32), params
    )


def load_torch_head(module, flax_params, prefix):
    """Our Flax head's parameters into the PyTorch module, by heads.torch_name (kernels transposed)."""
    flat = {"/".join(k): v for k, v in _flatten(flax_params).items()}
    sd = {}
    for path, value in flat.items():
        if not path.startswith(prefix + "/"):
            continue
        value = np.asarray(value)
        sd[heads.torch_name(path)] = _t(value.T if path.endswith("kernel") else value)
    module.load_state_dict(sd, strict=True)
    return module


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


@pytest.mark.parametrize("kind,num_inner", [("mlp_v1", 0), ("mlp_v1", 2), ("mlp_v2", 0), ("mlp_v2", 2),
                                            ("linear", 0), ("ln_linear", 0), ("mlp", 0)])  # fmt: skip
def test_heads_match_pytorch(kind, num_inner):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 24)), jnp.float32)
    head = heads.Head(kind, out_dim=40, hidden_dim=56, num_inner=num_inner)
    params = randomized(jax.jit(head.init)(jax.random.PRNGKey(0), x)["params"], 1)
    ours = head.apply({"params": params}, x)
    ref = load_torch_head(torch_head(kind, 24, 56, 40, num_inner), {"h": params}, "h")
    with torch.no_grad():
        expected = ref(_t(x)).numpy()
    assert rel_err(ours, expected) < 1e-5


# ---------------------------------------------------------------- normalization


def numpy_phi_s(x: np.ndarray):
    """RADIO's examples/common/phi_s.py get_phi_s_matrix in float64 numpy, with our sign convention."""
    mean = x.mean(0)
    cov = np.cov((x - mean).T)
    e, u = np.linalg.eigh(cov)
    e = np.where(e >= 0, e, 0)
    u = u * np.where(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])] < 0, -1.0, 1.0)
    h = hadamard.hadamard(x.shape[1]).astype(np.float64)
    return mean, (1.0 / math.sqrt(e.mean())) * (h @ u.T)


def known_covariance_samples(dim, n, seed):
    """n samples of a Gaussian with mean 3 and covariance Q diag(eigenvalues) Q^T (eigenvalues 0.1..10)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigenvalues = np.geomspace(0.1, 10.0, dim)
    cov = (q * eigenvalues) @ q.T
    z = rng.standard_normal((n, dim)) @ (q * np.sqrt(eigenvalues)).T + 3.0
    return z.astype(np.float32), cov


@pytest.mark.parametrize("dim", [64, 48, 12])  # Sylvester, Sylvester x Paley I(12), Paley I(12)
def test_phi_s_against_numpy_and_known_covariance(dim):
    x, cov = known_covariance_samples(dim, 6000, seed=dim)
    stats = normalize.init_stats("phi_s", dim)
    steps = 3  # pooled over three steps (Chan's update), then frozen
    chunks = np.split(x, steps)
    update = jax.jit(lambda s, c: normalize.normalize("phi_s", c, s, phi_s_steps=steps))
    for chunk in chunks:
        _, stats = update(stats, jnp.asarray(chunk))
    mean, transform = numpy_phi_s(x.astype(np.float64))
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-5)
    assert rel_err(stats["transform"], transform) < 1e-4  # float32 eigenvectors of a conditioned cov
    # Frozen after `steps` steps: another batch changes nothing.
    y, frozen = update(stats, jnp.asarray(x[:100] * 5))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), frozen, stats))
    assert rel_err(y, (x[:100] * 5 - mean) @ transform.T) < 1e-4
    # What PHI-S promises: every channel has the same variance, 1 on average (the covariance becomes
    # s^2 H diag(eigenvalues) H^T, whose diagonal is s^2 * mean eigenvalue = 1 for a Hadamard H).
    t = np.asarray(stats["transform"], np.float64)
    np.testing.assert_allclose(np.diag(t @ np.cov(x.T) @ t.T), 1.0, rtol=1e-4)
    # On the known covariance: the population transform gives exactly unit channel variances, and the
    # sample transform nearly so (6000 samples).
    _, true_t = numpy_phi_s_from_cov(cov)
    np.testing.assert_allclose(np.diag(true_t @ cov @ true_t.T), 1.0, rtol=1e-6)  # H in float32
    np.testing.assert_allclose(np.diag(t @ cov @ t.T), 1.0, atol=0.1)


def numpy_phi_s_from_cov(cov):
    e, u = np.linalg.eigh(cov)
    h = hadamard.hadamard(cov.shape[0]).astype(np.float64)
    return None, (1.0 / math.sqrt(e.mean())) * (h @ u.T)


def test_phi_s_of_isotropic_features_is_identity_proportional():
    """Only where the eigenvalues are equal does PHI-S give a covariance proportional to the identity
    (it equalizes the channels' variances; it does not whiten)."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    x = (rng.standard_normal((20000, 32)) * 2.0) @ q.T  # covariance 4 I, rotated
    _, stats = normalize.normalize("phi_s", jnp.asarray(x, jnp.float32), normalize.init_stats("phi_s", 32),
                                   phi_s_steps=1)  # fmt: skip
    y = np.asarray(normalize.apply_phi_s(jnp.asarray(x, jnp.float32), stats), np.float64)
    np.testing.assert_allclose(np.cov(y.T), np.eye(32), atol=0.05)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 48, 64, 100, 192, 256, 384, 768, 1152, 6, 188])
def test_hadamard_matrices_are_orthogonal(n):
    h = hadamard.hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-5)
    plan = hadamard.plan(n)
    if plan.exact:  # every entry +-1/sqrt(n)
        np.testing.assert_allclose(np.abs(h) * math.sqrt(n), 1.0, rtol=1e-6)
    else:
        assert n in (6, 188) and "fallback" in plan.describe()
    if n & (n - 1) == 0:
        np.testing.assert_allclose(h * math.sqrt(n), scipy.linalg.hadamard(n), rtol=1e-6)
    # The same matrix from jax.numpy (what the jitted step builds).
    np.testing.assert_allclose(np.asarray(jax.jit(lambda: hadamard.hadamard(n, jnp))()), h, atol=1e-6)


def test_hadamard_plans_for_common_widths():
    assert hadamard.plan(768).describe() == "Sylvester(64) x Paley I(12, q=11)"
    assert hadamard.plan(1152).describe() == "Sylvester(32) x Paley II(36, q=17)"
    assert hadamard.plan(1280).describe() == "Sylvester(64) x Paley I(20, q=19)"
    assert hadamard.plan(1024).describe() == "Sylvester(1024)"
    assert hadamard.plan(28).paley == (1, 27, 3, 3)  # GF(27): a prime power
    assert hadamard.plan(100).paley == (2, 49, 7, 2)  # GF(49)
    assert all(hadamard.plan(n).exact for n in (192, 384, 1408, 1536, 1664, 2048))


def test_standardize_against_numpy_ema():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 10, 8)).astype(np.float32) * (i + 1) + i for i in range(5)]
    stats, total, schedule = normalize.init_stats("standardize", 8), 5, (0.9, 0.01)
    mean, std = np.zeros(8), np.ones(8)
    for step, b in enumerate(batches):
        m = float(normalize.momentum_at(step, total, schedule))
        expected_m = 0.01 + 0.5 * (0.9 - 0.01) * (1 + math.cos(math.pi * step / total))
        assert abs(m - expected_m) < 1e-6
        y, stats = normalize.normalize("standardize", jnp.asarray(b), stats, momentum=m)
        flat = b.reshape(-1, 8).astype(np.float64)
        mean = (1 - m) * mean + m * flat.mean(0)
        std = (1 - m) * std + m * (flat.std(0, ddof=1) + 1e-6)
        np.testing.assert_allclose(y, (b - mean) / (std + 1e-6), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["none", "standardize", "phi_s"])
def test_normalization_folds_into_the_last_linear(kind):
    x, _ = known_covariance_samples(12, 500, seed=1)
    _, stats = normalize.normalize(kind, jnp.asarray(x), normalize.init_stats(kind, 12), momentum=0.5,
                                   phi_s_steps=1)  # fmt: skip
    z = np.random.default_rng(2).standard_normal((7, 5)).astype(np.float32)
    kernel = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)
    bias = np.random.default_rng(4).standard_normal(12).astype(np.float32)
    expected = normalize.denormalize(kind, jnp.asarray(z @ kernel + bias), stats)
    k2, b2 = normalize.fold_into_linear(kind, stats, jnp.asarray(kernel), jnp.asarray(bias))
    np.testing.assert_allclose(z @ np.asarray(k2) + np.asarray(b2), expected, rtol=1e-4, atol=1e-4)
    if kind != "none":  # denormalize inverts normalize
        y, _ = normalize.normalize(kind, jnp.asarray(x), stats, update=False)
        np.testing.assert_allclose(normalize.denormalize(kind, y, stats), x, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="layernorm"):
        normalize.fold_into_linear("layernorm", {}, kernel, bias)


# ---------------------------------------------------------------- teacher dropping


def test_teacher_dropping_statistics():
    k, b, p = 4, 40000, 0.3
    losses = jax.random.uniform(jax.random.PRNGKey(0), (k, b))
    keep = np.asarray(dropping.keep_mask(jax.random.PRNGKey(1), losses, p))
    hardest = np.argmax(np.asarray(losses), axis=0)
    assert (keep[hardest, np.arange(b)] == 1).all()  # the hardest teacher of each image always stays
    others = np.ones((k, b), bool)
    others[hardest, np.arange(b)] = False
    kept = keep[others]
    sigma = math.sqrt(p * (1 - p) / kept.size)
    assert abs(kept.mean() - (1 - p)) < 5 * sigma  # each other teacher stays with probability 1 - p
    for t in range(k):  # per teacher too, and the draws of two teachers are uncorrelated
        row = keep[t][others[t]]
        assert abs(row.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / row.size)
    both = others[0] & others[1]
    corr = np.corrcoef(keep[0][both], keep[1][both])[0, 1]
    assert abs(corr) < 5 / math.sqrt(both.sum())
    # Same rng, same draws; another rng, others.
    np.testing.assert_array_equal(keep, dropping.keep_mask(jax.random.PRNGKey(1), losses, p))
    assert not np.array_equal(keep, dropping.keep_mask(jax.random.PRNGKey(2), losses, p))
    assert (np.asarray(dropping.keep_mask(jax.random.PRNGKey(1), losses, 0.0)) == 1).all()
    # Weights renormalized per image: each image's kept teachers average to its loss.
    per_image = (keep * np.asarray(losses)).sum(0) / keep.sum(0)
    np.testing.assert_allclose(dropping.combine(losses, jnp.asarray(keep)), per_image.mean(), rtol=1e-5)


def test_dropping_with_p_one_keeps_only_the_hardest():
    losses = jnp.asarray([[1.0, 5.0, 2.0], [3.0, 1.0, 2.5]])
    keep = np.asarray(dropping.keep_mask(jax.random.PRNGKey(0), losses, 1.0))
    np.testing.assert_array_equal(keep, [[0, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(dropping.combine(losses, jnp.asarray(keep)), (3 + 5 + 2.5) / 3, rtol=1e-6)


# ---------------------------------------------------------------- names and slots


def test_heads_are_keyed_by_teacher_name_not_order():
    teachers = [
        agg.TeacherTarget("siglip", 12, 20, (4, 4)),
        agg.TeacherTarget("dino", 8, 16, (8, 8), summary_head="mlp_v1", dense_head="ln_linear"),
        agg.TeacherTarget("sam", None, 10, (16, 16)),
    ]
    prefix = jnp.ones((2, 3, 32))
    patches = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 32)), jnp.float32)
    outs, trees = [], []
    for order in (teachers, teachers[::-1]):
        module = heads.TeacherHeads(agg.head_specs(order), hidden_dim=24)
        params = jax.jit(module.init)(jax.random.PRNGKey(0), prefix, patches)["params"]
        trees.append(jax.tree.map(lambda x: x.shape, params))
        outs.append((module, params))
    assert trees[0] == trees[1]
    assert sorted(trees[0]) == ["dino_dense", "dino_summary", "sam_dense", "siglip_dense", "siglip_summary"]
    a = outs[0][0].apply({"params": outs[0][1]}, prefix, patches)
    b = outs[1][0].apply({"params": outs[0][1]}, prefix, patches)  # the other order, the same parameters
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # Summary slots in name order: dino reads the CLS token, siglip the first register.
    assert agg.summary_teachers(teachers) == ("dino", "siglip")
    assert {s.name: s.token_slot for s in agg.head_specs(teachers) if s.summary_kind} == {
        "dino": 0,
        "siglip": 1,
    }
    assert agg.student_register_tokens(teachers, own_registers=4) == 5


def test_student_summary_tokens_are_its_prefix():
    from dmt_jax.models.vit import ViT

    teachers = [agg.TeacherTarget("a", 8, 8, (8, 8)), agg.TeacherTarget("b", 6, 8, (4, 4))]
    regs = agg.student_register_tokens(teachers, own_registers=2)
    encoder = ViT.from_variant("mu/4", img_size=32, num_reg_tokens=regs)
    student = agg.AgglomerativeStudent(encoder, heads.TeacherHeads(agg.head_specs(teachers), hidden_dim=16))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    params = jax.jit(student.init)(jax.random.PRNGKey(0), images)["params"]
    assert params["encoder"]["reg_token"].shape == (1, 3, 64)  # b's summary token + 2 registers
    out = student.apply({"params": params}, images)
    tokens = encoder.apply({"params": params["encoder"]}, images)
    head_b = heads.Head("mlp_v2", 6, 16, num_inner=1)
    expected = head_b.apply({"params": params["heads"]["b_summary"]}, tokens[:, 1])  # slot 1: after CLS
    np.testing.assert_allclose(out["b"]["summary"], expected, rtol=1e-6)
    assert out["a"]["dense"].shape == (2, 64, 8)
