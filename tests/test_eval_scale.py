"""Evaluation at scale: features kept sharded over devices and processes (evaluate.Bank), k-NN as a top-k
per shard then merged (equal to one top-k over the whole bank), the minibatch linear probe against the
full-batch one, 2 processes equal 1; no data baked into compiled programs, one program per shape, labels
that travel with their images whatever the mesh's device order, an eval batch that fits any device count."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_run import Run, free_port
from jax.sharding import Mesh

from dmt_jax import evaluate, parallel
from dmt_jax.errors import UserError

MB = 1 << 20


def clusters(rng, n, classes, dim, noise, centers=None):
    centers = rng.standard_normal((classes, dim)) if centers is None else centers
    y = rng.integers(0, classes, n)
    return (centers[y] + noise * rng.standard_normal((n, dim))).astype(np.float32), y, centers


def knn_reference(bank_x, bank_y, x, y, k=20, temperature=0.07):
    """Weighted k-NN top-1 (percent) in numpy, over the whole bank at once (float64)."""
    a = bank_x / np.linalg.norm(bank_x, axis=1, keepdims=True)
    b = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)
    k = min(k, len(a))
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(b), int(max(bank_y.max(), y.max())) + 1))
    np.add.at(
        votes,
        (np.arange(len(b))[:, None], bank_y[idx]),
        np.exp(np.take_along_axis(sims, idx, 1) / temperature),
    )
    return 100.0 * float((votes.argmax(1) == y).mean())


def full_batch_probe(train_x, train_y, test_x, test_y, steps=300, lr=1e-2, wd=1e-4):
    """The probe before evaluation was sharded: full-batch AdamW on standardized features, one device."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, y = jnp.asarray((train_x - mean) / std), jnp.asarray(train_y)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=wd)
    params = {"w": jnp.zeros((x.shape[1], classes)), "b": jnp.zeros((classes,))}

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    logits = jnp.asarray((test_x - mean) / std) @ params["w"] + params["b"]
    return 100.0 * float((np.asarray(logits.argmax(-1)) == test_y).mean())


@pytest.mark.parametrize("n_bank, batch, k", [(1000, 64, 20), (37, 16, 20)])  # 37 rows: < k on most devices
def test_sharded_knn_equals_one_top_k_over_the_whole_bank(n_bank, batch, k):
    rng = np.random.default_rng(0)
    bank_x, bank_y, centers = clusters(rng, n_bank, 10, 32, 1.6)
    x, y, _ = clusters(rng, 300, 10, 32, 1.6, centers)
    want = knn_reference(bank_x, bank_y, x, y, k)
    assert 30 < want < 95  # neither trivial nor hopeless: a wrong neighbour would show
    for mesh in (parallel.make_mesh(4, 2), parallel.make_mesh(1, 1, devices=jax.devices()[:1])):
        bank = evaluate.bank_from_host(bank_x, bank_y, mesh, batch)
        queries = evaluate.bank_from_host(x, y, mesh, batch)
        assert evaluate.knn_top1(bank, queries, k) == want


def test_minibatch_probe_matches_the_full_batch_probe():
    rng = np.random.default_rng(1)
    train_x, train_y, centers = clusters(rng, 1500, 20, 48, 2.2)
    test_x, test_y, _ = clusters(rng, 500, 20, 48, 2.2, centers)
    want = full_batch_probe(train_x, train_y, test_x, test_y)
    assert 40 < want < 95
    mesh = parallel.make_mesh(4, 2)
    bank = evaluate.bank_from_host(train_x, train_y, mesh, 128)
    queries = evaluate.bank_from_host(test_x, test_y, mesh, 128)
    got = evaluate.linear_probe_top1(bank, queries)  # the defaults: 150 epochs, batch 256
    assert abs(got - want) <= 1.0, (got, want)
    chance = evaluate.linear_probe_top1(
        bank, evaluate.bank_from_host(test_x, rng.permutation(test_y), mesh, 128)
    )
    assert chance < 15  # labels unrelated to the features: chance level (5%)


def _collectives(text: str) -> list[tuple[str, int]]:
    """(kind, elements of its result) of every collective in a compiled HLO text."""
    found = []
    for line in text.splitlines():
        m = re.search(
            r"= \(?([a-z0-9]+)\[([0-9,]*)\][^ ]* (all-gather|all-reduce|collective-permute|all-to-all)", line
        )
        if m:
            found.append((m.group(3), int(np.prod([int(d) for d in m.group(2).split(",") if d] or [1]))))
    return found


def test_no_program_moves_the_bank():
    """Writing a batch moves nothing; k-NN gathers queries and each device's k candidates, the probe its
    gradients: every collective is far smaller than a device's share of the bank."""
    mesh = parallel.make_mesh(4, 2)
    rng = np.random.default_rng(2)
    bank = evaluate.bank_from_host(*clusters(rng, 32768, 10, 64, 1.0)[:2], mesh, 256)
    share = bank.x.size // 8  # 4096 rows x 64 per device
    write = evaluate._bank_writer(mesh)
    rows = jax.device_put(jnp.zeros((256, 64)), parallel.batch_sharding(mesh))
    labels = jax.device_put(jnp.zeros((256,), jnp.int32), parallel.batch_sharding(mesh))
    written = write.lower([bank], jnp.int32(0), [rows], labels, labels > 0).compile().as_text()
    assert _collectives(written) == []
    knn = evaluate._knn_program(mesh, 20, 0.07, 10).lower(bank, bank, jnp.int32(0)).compile().as_text()
    probe = evaluate._probe_epoch_program(mesh, 1e-2, 1e-4, 100, 32)
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}
    opt_state = evaluate._probe_optimizer(1e-2, 1e-4, 100).init(params)
    stats = evaluate._stats_program(mesh)(bank)
    probe_text = probe.lower(params, opt_state, bank, stats, jax.random.PRNGKey(0)).compile().as_text()
    for text in (knn, probe_text):
        sizes = [size for _, size in _collectives(text)]
        assert sizes and max(sizes) <= share // 4, sizes
    # The check sees a gathered bank: the same k-NN with the bank's rows replicated first.
    gathered = jax.jit(lambda b: jax.lax.with_sharding_constraint(b.x, parallel.replicated(mesh)).sum())
    assert max(size for _, size in _collectives(gathered.lower(bank).compile().as_text())) >= share


def test_each_device_holds_its_share_of_a_large_bank():
    """Compiled (not run) for a 1000 x 256 x 768 bank (750 MB; 94 MB per device of 8): no program needs
    much more than its device's share (the bank is an argument, its temporaries small)."""
    from jax.sharding import NamedSharding

    mesh = parallel.make_mesh(4, 2)
    banked, replicated = NamedSharding(mesh, evaluate.BANK_SPEC), parallel.replicated(mesh)
    bank = evaluate.Bank(
        jax.ShapeDtypeStruct((1000, 256, 768), jnp.float32, sharding=banked),
        jax.ShapeDtypeStruct((1000, 256), jnp.int32, sharding=banked),
    )
    queries = evaluate.Bank(
        jax.ShapeDtypeStruct((4, 256, 768), jnp.float32, sharding=banked),
        jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=banked),
    )
    params = {"w": jnp.zeros((768, 1000)), "b": jnp.zeros((1000,))}
    opt_state = evaluate._probe_optimizer(1e-2, 1e-4, 100).init(params)
    stats = {k: jax.ShapeDtypeStruct((768,), jnp.float32, sharding=replicated) for k in ("mean", "std")}
    programs = [
        evaluate._knn_program(mesh, 20, 0.07, 1000).lower(bank, queries, jnp.int32(0)),
        evaluate._stats_program(mesh).lower(bank),
        evaluate._probe_epoch_program(mesh, 1e-2, 1e-4, 100, 32).lower(
            params, opt_state, bank, stats, jax.random.PRNGKey(0)
        ),
    ]
    share = 1000 * 256 * 768 * 4 / 8
    for lowered in programs:
        m = lowered.compile().memory_analysis()
        peak = (
            m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        )
        assert share <= peak < 1.5 * share, (peak / MB, share / MB)


def test_programs_hold_no_large_constant():
    mesh = parallel.make_mesh(4, 2)
    rng = np.random.default_rng(0)
    bank = evaluate.bank_from_host(*clusters(rng, 4096, 100, 128, 1.0)[:2], mesh, 256)  # 2 MB: would show
    params = {"w": jnp.zeros((128, 100)), "b": jnp.zeros((100,))}
    opt_state = evaluate._probe_optimizer(1e-2, 1e-4, 100).init(params)
    stats = evaluate._stats_program(mesh)(bank)
    lowered = [
        evaluate._knn_program(mesh, 20, 0.07, 100).lower(bank, bank, jnp.int32(0)),
        evaluate._probe_epoch_program(mesh, 1e-2, 1e-4, 100, 64).lower(
            params, opt_state, bank, stats, jax.random.PRNGKey(0)
        ),
        evaluate._probe_eval_program(mesh).lower(params, bank, stats),
    ]
    for program in lowered:
        assert len(program.as_text()) < MB / 4


def test_a_baked_in_constant_would_be_seen():
    """The check above can fail: a closed-over array shows in the lowered text at full size."""
    bank = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 128)).astype(np.float32))
    assert len(jax.jit(lambda q: q @ bank.T).lower(jnp.zeros((64, 128))).as_text()) > MB


def test_knn_compiles_once_for_every_query_batch_and_call():
    mesh = parallel.make_mesh(4, 2)
    rng = np.random.default_rng(1)
    bank_x, bank_y, centers = clusters(rng, 300, 5, 16, 0.2)
    x, y, _ = clusters(rng, 70, 5, 16, 0.2, centers)
    bank, queries = evaluate.bank_from_host(bank_x, bank_y, mesh, 32), evaluate.bank_from_host(x, y, mesh, 32)
    program = evaluate._knn_program(mesh, 20, 0.07, 5)
    program.clear_cache()
    top1 = evaluate.knn_top1(bank, queries)  # query batches 32, 32, 6 (+ 26 padding rows)
    assert evaluate.knn_top1(bank, queries) == top1 > 95
    assert program._cache_size() == 1


@pytest.mark.parametrize(
    "requested,devices,expected", [(12, 8, 16), (256, 512, 512), (128, 8, 128), (1, 3, 3)]
)
def test_eval_batch_rounds_up_to_the_device_count(requested, devices, expected):
    assert evaluate.eval_batch_size(requested, devices) == expected


def _label_batches(rng, count=3, valid=13):
    """Batches whose images carry their label as every pixel (so a feature can be checked against it)."""
    out = []
    for _ in range(count):
        label = rng.integers(0, 200, 16).astype(np.int32)
        image = np.broadcast_to(label[:, None, None, None], (16, 4, 4, 3)).astype(np.uint8)
        out.append({"image": image, "label": label, "valid": np.arange(16) < valid})
    return out


def test_labels_line_up_with_features_on_a_shuffled_mesh():
    devices = np.asarray(jax.devices())[[5, 2, 7, 0, 3, 6, 1, 4]].reshape(4, 2)
    mesh = Mesh(devices, parallel.BATCH_AXES)
    rng = np.random.default_rng(2)
    first_pixel = jax.jit(lambda pixels: pixels[:, 0, 0, :1].astype(jnp.float32))
    features, labels = evaluate.collect(first_pixel, _label_batches(rng), mesh)
    assert len(labels) == 39
    np.testing.assert_array_equal(features[:, 0].astype(np.int32), labels)

    batches = _label_batches(rng)
    (bank,) = evaluate.collect_banks(first_pixel, batches, mesh)
    x, y = np.asarray(bank.x)[..., 0].reshape(-1), np.asarray(bank.y).reshape(-1)
    assert bank.count() == 39 and (y[y < 0].size == 9)  # 3 padding rows per batch, labelled -1
    np.testing.assert_array_equal(x[y >= 0].astype(np.int32), y[y >= 0])
    assert sorted(y[y >= 0]) == sorted(np.concatenate([b["label"][b["valid"]] for b in batches]))


def test_a_split_with_no_readable_image_is_one_clear_error():
    batches = _label_batches(np.random.default_rng(3), count=2, valid=0)
    with pytest.raises(UserError, match="no image of an evaluation split could be read"):
        evaluate.collect_banks(
            jax.jit(lambda p: p[:, 0, 0].astype(jnp.float32)), batches, parallel.make_mesh(4, 2)
        )


def _image_folder(root, per_class, rng):
    from PIL import Image

    colours = np.random.default_rng(0).integers(40, 216, (6, 3))  # the same per class in every split
    for c, colour in enumerate(colours):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 45, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")


def test_two_processes_equal_one(tmp_path):
    """The same folders evaluated by 1 process x 4 devices and by 2 processes x 2 devices (jax.distributed
    on localhost): each process holds half of the bank, k-NN is equal, the probe within 1 point."""
    rng = np.random.default_rng(4)
    _image_folder(tmp_path / "images" / "train", 23, rng)  # 138 rows: the last batch padded
    _image_folder(tmp_path / "images" / "eval", 10, rng)
    results = {}
    for processes in (1, 2):
        port, out = free_port(), tmp_path / f"p{processes}.json"
        runs = [
            Run(
                [tmp_path / "images", out, port, i, processes],
                devices=4 // processes,
                module="tests.eval_scale_child",
            )
            for i in range(processes)
        ]
        assert [r.finish(timeout=400) for r in runs] == [0] * processes, runs[0].output[-3000:]
        results[processes] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert one["devices"] == two["devices"] == 4 and two["processes"] == 2
    assert one["rows"] == two["rows"] == 138
    assert one["local_fraction"] == 1 and two["local_fraction"] == 0.5
    assert 40 < one["knn"] < 100 and two["knn"] == one["knn"]
    assert one["probe"] > 40 and abs(two["probe"] - one["probe"]) <= 1.0 + 1e-9, (one, two)


def test_long_work_reports_progress_and_short_work_stays_quiet(monkeypatch, capsys):
    monkeypatch.setenv("DMT_PROGRESS", "lines")
    mesh = parallel.make_mesh(4, 2)
    rng = np.random.default_rng(5)
    bank_x, bank_y, centers = clusters(rng, 200, 5, 16, 0.5)
    bank = evaluate.bank_from_host(bank_x, bank_y, mesh, 64)
    queries = evaluate.bank_from_host(*clusters(rng, 50, 5, 16, 0.5, centers)[:2], mesh, 64)
    evaluate.knn_top1(bank, queries)
    evaluate.linear_probe_top1(bank, queries, epochs=3)
    assert capsys.readouterr().err == ""  # the demo's size: seconds, no lines
    for name in ("_MIN_IMAGES", "_MIN_SIMILARITIES", "_MIN_ROW_EPOCHS"):
        monkeypatch.setattr(evaluate, name, 0)
    evaluate.collect_banks(
        jax.jit(lambda p: p[:, 0, 0].astype(jnp.float32)), _label_batches(rng), mesh, what="bank"
    )
    evaluate.knn_top1(bank, queries, what="k-NN (student)")
    evaluate.linear_probe_top1(bank, queries, epochs=3, what="linear probe (student)")
    err = capsys.readouterr().err
    for line in (
        "bank: done, 48 img",
        "k-NN (student): done, 64 queries",
        "linear probe (student): done, 3 epochs",
    ):
        assert line in err, err
